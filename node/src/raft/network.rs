//! The client side of the Raft peer transport: one cached tonic channel per peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailvault_proto::raft::raft_peer_client::RaftPeerClient;
use mailvault_proto::raft::{CheckpointPart, RaftPayload, ReadIndexRequest};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Snapshot, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig};

use super::PEER_MAX_MESSAGE_BYTES;
use crate::error::{ApiError, Reason};
use crate::state::codec::{decode, encode};
use crate::state::snapshot_data::{CheckpointFile, SnapshotData};
use crate::state::types::{entry_bytes, CheckpointOffer, Member, NodeId, TypeConfig};
use crate::store::Durability;

/// Cached peer channels, shared by the Raft network and the read-index client.
/// Every channel is mTLS with this node's certificate.
#[derive(Clone)]
pub struct PeerClients {
    tls: ClientTlsConfig,
    local: Option<std::net::IpAddr>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Set once a member refused this node as no longer a member.
    told_removed: Arc<std::sync::atomic::AtomicBool>,
}

impl PeerClients {
    /// Peer channels presenting `tls`'s identity, connecting from `local`
    /// when given (this node's own address, so peer traffic always leaves
    /// from the address the node is known by).
    pub fn new(tls: ClientTlsConfig, local: Option<std::net::IpAddr>) -> PeerClients {
        PeerClients {
            tls,
            local,
            channels: Arc::default(),
            told_removed: Arc::default(),
        }
    }

    /// Whether a member refused this node as no longer a member
    /// (`NOT_A_MEMBER`): it was removed or replaced.
    pub fn told_removed(&self) -> bool {
        self.told_removed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes a peer's refusal, if it says this node is not a member.
    pub fn note_refusal(&self, s: &tonic::Status) {
        use tonic_types::StatusExt;
        if s.get_details_error_info()
            .is_some_and(|i| i.reason == "NOT_A_MEMBER")
        {
            self.told_removed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A lazily connecting mTLS channel to `addr` (cached).
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().expect("peer channel lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = Channel::from_shared(format!("https://{addr}"))
            .expect("valid peer uri")
            .tls_config(self.tls.clone())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .local_address(self.local)
            // A peer that stops answering (partition, pause) is noticed and
            // the connection replaced, instead of waiting for TCP to give up.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .connect_lazy();
        map.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A client for the peer at `addr` (connects lazily).
    pub fn client(&self, addr: &str) -> Result<RaftPeerClient<Channel>, tonic::transport::Error> {
        Ok(RaftPeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES))
    }

    /// Asks the leader at `addr` for the log index a linearizable read must wait for.
    pub async fn read_index(&self, addr: &str, timeout: Duration) -> Result<u64, tonic::Status> {
        let mut c = self
            .client(addr)
            .map_err(|_| ApiError::new(Reason::LeaderUnreachable, "leader unreachable"))?;
        let mut req = tonic::Request::new(ReadIndexRequest {});
        req.set_timeout(timeout);
        let answer = c.read_index(req).await.inspect_err(|s| self.note_refusal(s));
        Ok(answer?.into_inner().index)
    }

    /// Asks the voter at `addr` to start an election now (leadership
    /// placement, a leadership transfer); openraft 0.9 has no transfer.
    pub async fn campaign(&self, addr: &str, timeout: Duration) -> Result<(), tonic::Status> {
        let mut c = self
            .client(addr)
            .map_err(|_| ApiError::new(Reason::LeaderUnreachable, "peer unreachable"))?;
        let mut req = tonic::Request::new(mailvault_proto::raft::CampaignRequest {});
        req.set_timeout(timeout);
        c.campaign(req).await?;
        Ok(())
    }
}

/// Creates per-peer network handles for openraft.
#[derive(Clone)]
pub struct PeerNetwork {
    clients: PeerClients,
    durability: Arc<Durability>,
}

impl PeerNetwork {
    /// A network sharing the given channel cache, telling followers a commit
    /// index only as far as `durability` says this leader's log is on disk.
    pub fn new(clients: PeerClients, durability: Arc<Durability>) -> PeerNetwork {
        PeerNetwork { clients, durability }
    }
}

/// The connection to one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    clients: PeerClients,
    durability: Arc<Durability>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            clients: self.clients.clone(),
            durability: self.durability.clone(),
        }
    }
}

type RpcErr<E> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self
            .clients
            .client(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data: encode(req) });
        request.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::Append => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.inspect_err(|s| self.clients.note_refusal(s));
        let reply = reply.map_err(|s| match s.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&s)),
            _ => RPCError::Network(NetworkError::new(&s)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// How long a heartbeat waits for the leader's own sync of the commit index
/// it carries, at most, before it goes with a lower one. Short: heartbeats
/// also confirm leadership for linearizable reads, within one heartbeat
/// interval, and a slow disk must not make them miss it.
const HEARTBEAT_SYNC_WAIT: Duration = Duration::from_millis(2);

impl PeerConnection {
    /// Tells the follower a commit index only as far as the leader's own log
    /// is on disk (`store::durability`, rule 2). A heartbeat — sent when the
    /// commit index moves — first waits briefly for that sync, which is
    /// already under way; entries go at once. An index held back is noted,
    /// so that a heartbeat sends it once synced.
    async fn limit_commit(&self, rpc: &mut AppendEntriesRequest<TypeConfig>) {
        let Some(commit) = rpc.leader_commit else {
            return;
        };
        let mut limited = self.durability.commit_limit(rpc.leader_commit);
        if limited != rpc.leader_commit && rpc.entries.is_empty() {
            self.durability
                .wait_synced_through_for(commit.index, HEARTBEAT_SYNC_WAIT)
                .await;
            limited = self.durability.commit_limit(rpc.leader_commit);
        }
        if limited != rpc.leader_commit {
            self.durability.note_held_back(commit.index);
            rpc.leader_commit = limited;
        }
    }
}

/// Sends a heartbeat — which carries the commit index — whenever a commit
/// index held back from a follower (`PeerConnection::limit_commit`) is
/// synced, so followers do not wait for the next regular heartbeat to apply
/// it. Ends when Raft stops or a sync fails.
pub async fn resend_held_back_commits(raft: crate::state::types::Raft, durability: Arc<Durability>) {
    let mut held_back = durability.held_back();
    while held_back.changed().await.is_ok() {
        let index = *held_back.borrow_and_update();
        if durability.wait_synced_through(index).await.is_err() || raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

/// Most entry bytes sent in one AppendEntries call (at least one entry is
/// always sent). openraft 0.9 bounds a call by entry count only and gives it
/// one heartbeat interval to complete; 64 entries of large messages would
/// not fit in that, time out every time and leave a lagging follower behind
/// for good. The rest follows in the next call (a partial success).
const MAX_APPEND_BYTES: usize = 1024 * 1024;

/// Keeps the leading entries that fit in [`MAX_APPEND_BYTES`] (at least one);
/// returns the last kept entry's log id when some were left out.
fn bound_payload(rpc: &mut AppendEntriesRequest<TypeConfig>) -> Option<crate::state::types::LogId> {
    let mut bytes = 0;
    let keep = rpc
        .entries
        .iter()
        .take_while(|e| {
            bytes += entry_bytes(e);
            bytes <= MAX_APPEND_BYTES
        })
        .count()
        .max(1);
    if keep >= rpc.entries.len() {
        return None;
    }
    rpc.entries.truncate(keep);
    rpc.entries.last().map(|e| e.log_id)
}

/// Bytes of a checkpoint file per transfer part.
const CHECKPOINT_PART_BYTES: usize = 1 << 20;

/// A checkpoint transfer whose receiver takes no part for this long is
/// given up (openraft tries again later, with the then current snapshot).
const TRANSFER_STALL: Duration = Duration::from_secs(30);

/// Feeds a checkpoint transfer: the offer, then every file in parts, each
/// file's last part with the SHA-256 of what was read. Ends early (the
/// receiver then refuses the incomplete transfer) if a file cannot be read
/// or the receiver stalls.
async fn send_checkpoint(
    offer: CheckpointOffer,
    files: Vec<CheckpointFile>,
    tx: tokio::sync::mpsc::Sender<CheckpointPart>,
) -> std::io::Result<()> {
    use sha2::Digest;
    let send = |part: CheckpointPart| {
        let tx = tx.clone();
        async move {
            match tokio::time::timeout(TRANSFER_STALL, tx.send(part)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(std::io::Error::other("the transfer ended")),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the receiver stalled",
                )),
            }
        }
    };
    send(CheckpointPart {
        offer: encode(&offer),
        ..Default::default()
    })
    .await?;
    for (index, f) in files.into_iter().enumerate() {
        let (mut file, mut left, mut sum) = (f.file, f.len, sha2::Sha256::new());
        loop {
            let n = left.min(CHECKPOINT_PART_BYTES as u64) as usize;
            let (back, data) = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut data = vec![0u8; n];
                file.read_exact(&mut data).map(|()| (file, data))
            })
            .await
            .map_err(std::io::Error::other)??;
            file = back;
            sum.update(&data);
            left -= n as u64;
            let last = left == 0;
            let sha256 = if last {
                sum.clone().finalize().to_vec()
            } else {
                Vec::new()
            };
            metrics::counter!("mailvault_snapshot_sent_bytes_total").increment(n as u64);
            send(CheckpointPart {
                offer: Vec::new(),
                file: index as u32,
                data,
                sha256,
            })
            .await?;
            if last {
                break;
            }
        }
    }
    Ok(())
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    /// Sends a snapshot — a checkpoint of this node's state database — file
    /// by file over `TransferCheckpoint`, instead of openraft's chunks of one
    /// byte stream: nothing is copied into a stream first, and the follower
    /// installs it by swapping the received directory in. Given up when
    /// openraft cancels it, the receiver stalls or the connection breaks.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let network = |why: String| StreamingError::Network(NetworkError::new(&std::io::Error::other(why)));
        let SnapshotData::Checkpoint(files) = *snapshot.snapshot else {
            return Err(network("only a checkpoint is sent as a snapshot".into()));
        };
        let offer = CheckpointOffer {
            vote,
            meta: snapshot.meta.clone(),
            files: files.iter().map(|f| (f.name.clone(), f.len)).collect(),
        };
        let bytes: u64 = offer.files.iter().map(|(_, l)| l).sum();
        let started = std::time::Instant::now();
        let mut client = self
            .clients
            .client(&self.addr)
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let feeder = tokio::spawn(send_checkpoint(offer, files, tx));
        let call = client.transfer_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx));
        let reply = tokio::select! {
            reply = call => reply,
            closed = cancel => {
                feeder.abort();
                return Err(StreamingError::Closed(closed));
            }
        };
        let fed = feeder.await;
        let reply = reply.map_err(|s| match s.code() {
            tonic::Code::Unavailable => StreamingError::Unreachable(Unreachable::new(&s)),
            _ => StreamingError::Network(NetworkError::new(&s)),
        })?;
        let outcome: super::peer_service::TransferOutcome =
            decode(&reply.into_inner().data).map_err(|e| network(e.to_string()))?;
        match (outcome, fed) {
            (Ok(resp), _) => {
                tracing::info!(
                    target_node = self.target,
                    bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "snapshot sent"
                );
                Ok(resp)
            }
            (Err(why), Ok(Err(e))) => Err(network(format!("{why} (sending: {e})"))),
            (Err(why), _) => Err(network(why)),
        }
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let sent_up_to = bound_payload(&mut rpc);
        self.limit_commit(&mut rpc).await;
        let resp = self.call(Method::Append, &rpc, &option).await?;
        Ok(match (resp, sent_up_to) {
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
            (other, _) => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(Method::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call(Method::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::Command;
    use crate::state::types::{Batch, Entry};

    fn entry(index: u64, bytes: usize) -> Entry {
        Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(Batch {
                commands: vec![Command::PutChunk {
                    tenant: "t".into(),
                    blob: [0; 16],
                    index: 0,
                    ciphertext: serde_bytes::ByteBuf::from(vec![0u8; bytes]),
                }],
            }),
        }
    }

    fn request(sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: sizes
                .iter()
                .enumerate()
                .map(|(i, &b)| entry(i as u64 + 1, b))
                .collect(),
        }
    }

    #[test]
    fn large_payloads_are_sent_in_parts_of_at_most_a_mebibyte() {
        // Small entries all go at once.
        let mut r = request(&[1000; 10]);
        assert_eq!(bound_payload(&mut r), None);
        assert_eq!(r.entries.len(), 10);
        // Five 300 KiB entries: three fit, the call reports up to the third.
        let mut r = request(&[300 * 1024; 5]);
        assert_eq!(bound_payload(&mut r).map(|l| l.index), Some(3));
        assert_eq!(r.entries.len(), 3);
        // An entry larger than the bound still goes, alone.
        let mut r = request(&[4 << 20, 10]);
        assert_eq!(bound_payload(&mut r).map(|l| l.index), Some(1));
        assert_eq!(r.entries.len(), 1);
    }

    fn log_id(index: u64) -> crate::state::types::LogId {
        openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
    }

    fn connection(durability: Arc<Durability>) -> PeerConnection {
        PeerConnection {
            target: 2,
            addr: "127.0.0.1:9".into(),
            clients: PeerClients::new(ClientTlsConfig::new(), None),
            durability,
        }
    }

    #[tokio::test]
    async fn followers_hear_of_a_commit_only_once_the_leader_has_synced_it() {
        let durability = Arc::new(Durability::default());
        let conn = connection(durability.clone());
        let mut held_back = durability.held_back();
        // Entries 1-4 are on disk; the leader's append of 5 is not yet.
        durability.push(5, Some(log_id(4)));

        // Entries go at once, with the commit index cut to the synced log.
        let mut r = request(&[10; 5]);
        r.leader_commit = Some(log_id(5));
        conn.limit_commit(&mut r).await;
        assert_eq!(r.leader_commit, Some(log_id(4)));
        assert_eq!(r.entries.len(), 5);
        assert!(held_back.has_changed().unwrap());
        assert_eq!(*held_back.borrow_and_update(), 5);

        // A commit index the leader has synced goes unchanged.
        let mut r = request(&[10; 4]);
        r.leader_commit = Some(log_id(4));
        conn.limit_commit(&mut r).await;
        assert_eq!(r.leader_commit, Some(log_id(4)));

        // A heartbeat waits for a sync that comes in time…
        let mut r = request(&[]);
        r.leader_commit = Some(log_id(5));
        let syncer = tokio::spawn({
            let durability = durability.clone();
            async move { durability.synced_one() }
        });
        conn.limit_commit(&mut r).await;
        assert_eq!(r.leader_commit, Some(log_id(5)));
        syncer.await.unwrap();

        // …and goes with the synced log's commit if it does not.
        durability.push(6, Some(log_id(5)));
        let mut r = request(&[]);
        r.leader_commit = Some(log_id(6));
        conn.limit_commit(&mut r).await;
        assert_eq!(r.leader_commit, Some(log_id(5)));
        assert_eq!(*held_back.borrow_and_update(), 6);
    }
}
