//! The server side of the Raft peer transport. Served only on the peer listener.

use std::time::Duration;

use mailvault_proto::raft::raft_peer_server::RaftPeer;
use mailvault_proto::raft::{
    CampaignRequest, CampaignResponse, CheckpointPart, ProbeRequest, ProbeResponse, RaftPayload,
    ReadIndexRequest, ReadIndexResponse,
};
use tonic::{Request, Response, Status, Streaming};

use super::{Health, ReadFence};
use crate::error::{self, ApiError, Reason};
use crate::proposer::Proposer;
use crate::state::audit::AuditEvent;
use crate::state::codec::{decode, encode};
use crate::state::command::Command;
use crate::state::snapshot_data::SnapshotData;
use crate::state::types::{CheckpointOffer, NodeId, Raft};
use crate::store::{MailReader, StateMachine};
use crate::tls::CertIdentity;

/// The outcome of a checkpoint transfer, as the receiver answers it.
pub type TransferOutcome = Result<openraft::raft::SnapshotResponse<NodeId>, String>;

/// Hands peer RPCs to the local Raft instance.
#[derive(Clone)]
pub struct PeerService {
    raft: Raft,
    proposer: Proposer,
    fence: ReadFence,
    /// Where received checkpoints go.
    sm: StateMachine,
    /// The member records (a removed node is refused).
    reader: MailReader,
    /// This node's facts, for probes.
    health: Health,
}

impl PeerService {
    /// A service over `raft`; audit batches from followers go to `proposer`,
    /// snapshots into `sm`.
    pub fn new(
        raft: Raft,
        proposer: Proposer,
        fence: ReadFence,
        sm: StateMachine,
        reader: MailReader,
        health: Health,
    ) -> PeerService {
        PeerService {
            raft,
            proposer,
            fence,
            sm,
            reader,
            health,
        }
    }

    /// Refuses a caller whose removal the replicated state records: a
    /// removed or replaced node takes no part in elections or replication
    /// (openraft 0.9 would let its rising terms disrupt the cluster), and
    /// learns from the refusal that it is no longer a member.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(certs) = req.peer_certs() else {
            return Ok(());
        };
        let Some((CertIdentity::Node(id), _)) = certs.first().and_then(|c| crate::tls::identity_of(c)) else {
            return Ok(());
        };
        match self.reader.member_record(id) {
            Ok(Some(r)) if r.removed.is_some() => {
                let by = r.removed.map(|r| r.by).unwrap_or_default();
                metrics::counter!("mailvault_removed_node_refused_total").increment(1);
                Err(ApiError::new(
                    Reason::NotAMember,
                    format!("node {id} is no longer a member of this cluster (removed by {by})"),
                )
                .into())
            }
            _ => Ok(()),
        }
    }

    /// Receives a checkpoint's files (each checked against its SHA-256) and
    /// has Raft install it; whatever is not installed is removed.
    async fn receive_checkpoint(
        &self,
        offer: CheckpointOffer,
        mut parts: Streaming<CheckpointPart>,
    ) -> TransferOutcome {
        let started = std::time::Instant::now();
        let total: u64 = offer.files.iter().map(|(_, l)| l).sum();
        let sm = self.sm.clone();
        let files = offer.files.clone();
        let mut rx = tokio::task::spawn_blocking(move || sm.checkpoint_receiver(files))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        while let Some(part) = parts
            .message()
            .await
            .map_err(|s| format!("the transfer broke off: {}", s.message()))?
        {
            let sha = (!part.sha256.is_empty()).then_some(part.sha256);
            rx = tokio::task::spawn_blocking(move || {
                rx.chunk(part.file as usize, &part.data, sha.as_deref())?;
                Ok::<_, crate::store::checkpoint::CheckpointError>(rx)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        }
        let dir = tokio::task::spawn_blocking(move || rx.finish())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        metrics::counter!("mailvault_snapshot_received_bytes_total").increment(total);
        tracing::info!(
            bytes = total,
            files = offer.files.len(),
            seconds = started.elapsed().as_secs_f64(),
            "checkpoint received; installing"
        );
        let snapshot = openraft::Snapshot {
            meta: offer.meta,
            snapshot: Box::new(SnapshotData::Received(dir.clone())),
        };
        let result = self.raft.install_full_snapshot(offer.vote, snapshot).await;
        // Installed, it was moved; refused (a stale leader, nothing newer
        // than what is committed here), it is still there.
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result.map_err(|fatal| format!("raft stopped: {fatal}"))
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
        self.admit(&req)?;
        let rpc = decode_req(req)?;
        let started = std::time::Instant::now();
        let r = reply(&self.raft.append_entries(rpc).await);
        metrics::histogram!("mailvault_peer_append_seconds").record(started.elapsed().as_secs_f64());
        r
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.admit(&req)?;
        let rpc = decode_req(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.admit(&req)?;
        let rpc = decode_req(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn transfer_checkpoint(
        &self,
        req: Request<Streaming<CheckpointPart>>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.admit(&req)?;
        let mut parts = req.into_inner();
        let first = parts
            .message()
            .await?
            .ok_or_else(|| error::invalid("an empty checkpoint transfer"))?;
        let offer: CheckpointOffer =
            decode(&first.offer).map_err(|_| error::invalid("undecodable checkpoint offer"))?;
        let outcome = self.receive_checkpoint(offer, parts).await;
        if let Err(why) = &outcome {
            tracing::warn!(reason = %why, "a checkpoint transfer was refused");
        }
        reply(&outcome)
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.admit(&req)?;
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
        self.admit(&req)?;
        let events: Vec<AuditEvent> = decode_req(req)?;
        self.proposer
            .propose(Command::Audit { events })
            .await
            .map_err(crate::error::propose)?;
        reply(&())
    }

    async fn propose_backup(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.admit(&req)?;
        let change: crate::state::backup::BackupChange = decode_req(req)?;
        let result = self
            .proposer
            .propose(Command::Backups(change))
            .await
            .map_err(crate::error::propose)?;
        reply(&result)
    }

    async fn propose_restored(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.admit(&req)?;
        let command: Command = decode_req(req)?;
        if !matches!(
            command,
            Command::CreateMailbox { .. }
                | Command::PutChunk { .. }
                | Command::Append { .. }
                | Command::DropBlob { .. }
        ) {
            return Err(error::invalid(
                "only the mail commands of a mailbox restore are proposed for a peer",
            )
            .into());
        }
        let result = self
            .proposer
            .propose(command)
            .await
            .map_err(crate::error::propose)?;
        reply(&result)
    }

    async fn probe(&self, req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        self.admit(&req)?;
        let nonce = req.into_inner().nonce;
        if nonce.len() != 32 {
            return Err(error::invalid("a probe's nonce is 32 bytes").into());
        }
        let initialized = self.raft.is_initialized().await.unwrap_or(true);
        Ok(Response::new(self.health.answer(&self.raft, &nonce, initialized)))
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
