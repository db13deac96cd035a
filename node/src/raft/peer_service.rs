//! The server side of the Raft peer transport. Served only on the peer listener.

use std::time::Duration;

use mailvault_proto::raft::raft_peer_server::RaftPeer;
use mailvault_proto::raft::{
    CampaignRequest, CampaignResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use tonic::{Request, Response, Status};

use super::ReadFence;
use crate::error::{self, ApiError, Reason};
use crate::proposer::Proposer;
use crate::state::audit::AuditEvent;
use crate::state::codec::{decode, encode};
use crate::state::command::Command;
use crate::state::types::Raft;

/// Hands peer RPCs to the local Raft instance.
#[derive(Clone)]
pub struct PeerService {
    raft: Raft,
    proposer: Proposer,
    fence: ReadFence,
}

impl PeerService {
    /// A service over `raft`; audit batches from followers go to `proposer`.
    pub fn new(raft: Raft, proposer: Proposer, fence: ReadFence) -> PeerService {
        PeerService {
            raft,
            proposer,
            fence,
        }
    }
}

fn decode_req<T: for<'de> serde::Deserialize<'de>>(req: Request<RaftPayload>) -> Result<T, Status> {
    decode(&req.into_inner().data).map_err(|_| error::invalid("undecodable raft payload").into())
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload { data: encode(value) }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode_req(req)?;
        let started = std::time::Instant::now();
        let r = reply(&self.raft.append_entries(rpc).await);
        metrics::histogram!("mailvault_peer_append_seconds").record(started.elapsed().as_secs_f64());
        r
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode_req(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode_req(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn read_index(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        // Confirms leadership with a quorum, then names the index to wait for:
        // the read index, and at least this process's fence entry.
        let fut = async {
            let fence = self.fence.index().await;
            (self.raft.get_read_log_id().await, fence)
        };
        match tokio::time::timeout(Duration::from_secs(5), fut).await {
            Ok((Ok(_), Err(s))) => Err(s),
            Ok((Ok((read_log_id, _applied)), Ok(fence))) => Ok(Response::new(ReadIndexResponse {
                index: read_log_id.map(|l| l.index).unwrap_or(0).max(fence),
            })),
            Ok((Err(_), _)) => Err(ApiError::new(Reason::NotLeader, "not the leader").into()),
            Err(_) => Err(ApiError::new(
                Reason::LeadershipUnconfirmed,
                "leadership could not be confirmed in time",
            )
            .into()),
        }
    }

    async fn propose_audit(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let events: Vec<AuditEvent> = decode_req(req)?;
        self.proposer
            .propose(Command::Audit { events })
            .await
            .map_err(crate::error::propose)?;
        reply(&())
    }

    async fn campaign(&self, _req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        tracing::info!("asked by the leader to campaign (leadership placement)");
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|_| ApiError::new(Reason::ShuttingDown, "raft is shutting down"))?;
        Ok(Response::new(CampaignResponse {}))
    }
}
