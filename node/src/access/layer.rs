//! The tower layer in front of every client-listener service.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

use super::denials::Against;
use super::gate::Gate;
use super::lockout::REFUSED;
use super::principal::Principal;
use super::rules::rule_for;
use crate::error::{ApiError, Reason};
use crate::state::policy::ClusterRole;
use crate::tls::{identity_of, CertIdentity};

/// Header a node sets when it forwards a call: the original caller's identity.
pub const ON_BEHALF_OF: &str = "x-mailvault-on-behalf-of";
/// The original caller's certificate serial.
pub const ON_BEHALF_SERIAL: &str = "x-mailvault-on-behalf-serial";
/// The original caller's source address.
pub const ON_BEHALF_SOURCE: &str = "x-mailvault-on-behalf-source";
/// The original caller's certificate key fingerprint (see [`Principal::key`]).
pub const ON_BEHALF_KEY: &str = "x-mailvault-on-behalf-key";

/// Authenticates every call and admits it by its method's rule (see `rules.rs`).
#[derive(Clone)]
pub struct AccessLayer {
    gate: Arc<Gate>,
}

impl AccessLayer {
    /// A layer deciding with `gate`.
    pub fn new(gate: Gate) -> AccessLayer {
        AccessLayer { gate: Arc::new(gate) }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// The service the layer produces.
#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    gate: Arc<Gate>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for AccessService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        let input = CallInfo::of(&req);
        Box::pin(async move {
            match authenticate(&gate, input).await {
                Ok(p) => {
                    req.extensions_mut().insert(p);
                    inner.call(req).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// What the access check needs from a request (taken before the body moves on).
struct CallInfo {
    path: String,
    info: Option<TlsConnectInfo<TcpConnectInfo>>,
    headers: http::HeaderMap,
}

impl CallInfo {
    fn of<B>(req: &http::Request<B>) -> CallInfo {
        CallInfo {
            path: req.uri().path().to_string(),
            info: req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().cloned(),
            headers: req.headers().clone(),
        }
    }
}

fn header<'a>(req: &'a CallInfo, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn authenticate(gate: &Gate, call: CallInfo) -> Result<Principal, Status> {
    let req = &call;
    let path = call.path.as_str();
    let method = path.rsplit('/').next().unwrap_or("-").to_string();
    let info = call.info.as_ref();
    let addr = info.and_then(|i| i.get_ref().remote_addr()).map(|a| a.ip());
    let leaf = info.and_then(|i| i.peer_certs()).and_then(|c| c.first().cloned());
    let rule = rule_for(path);
    // Health and reflection are never counted towards a lockout.
    let probe = rule.is_some_and(|r| r.probe);
    // A node that is not a member serves nothing but its own status.
    if rule.is_some() && !probe && path != "/mailvault.v1.Cluster/NodeStatus" {
        (gate.member)()?;
    }
    let counts = |against| (!probe).then_some(against);
    let Some((cert_identity, serial)) = leaf.as_deref().and_then(identity_of) else {
        // A failed authentication: it counts against the address.
        if let Some(until) = gate.denials.address_locked_until(addr) {
            gate.denials.refuse_locked("-", addr, &method).await;
            return Err(crate::error::locked_out(until).into());
        }
        let (why, reason) = (
            Reason::CertificateWithoutIdentity,
            "no client certificate identity",
        );
        let denial = Denial {
            identity: "-",
            source: addr,
            method: &method,
            why,
            reason,
        };
        return Err(denial.record(gate, counts(Against::Address)).await);
    };
    let own_key = leaf
        .as_deref()
        .and_then(|d| mailvault_proto::approval::key_fingerprint(d).ok())
        .unwrap_or_default();
    let (identity, is_node, serial, source, key) = match cert_identity {
        CertIdentity::Node(id) => match header(req, ON_BEHALF_OF) {
            Some(user) => (
                user.to_string(),
                false,
                header(req, ON_BEHALF_SERIAL).unwrap_or("").to_string(),
                header(req, ON_BEHALF_SOURCE).and_then(|s| s.parse::<IpAddr>().ok()),
                header(req, ON_BEHALF_KEY).unwrap_or("").to_string(),
            ),
            None => (format!("node:{id}"), true, serial, addr, own_key),
        },
        CertIdentity::User(u) => (u, false, serial, addr, own_key),
    };
    // A method without a rule is not served on this port (the peer protocol
    // is served only on the Raft port); asking for it is no denial.
    let Some(rule) = rule else {
        return Err(crate::error::not_served(path));
    };
    let denial = |why, reason| Denial {
        identity: &identity,
        source,
        method: &method,
        why,
        reason,
    };
    // A node certificate is never locked out and its denials never count.
    if is_node {
        return match rule.nodes {
            true => Ok(Principal {
                identity: identity.clone(),
                is_node,
                serial,
                source,
                key,
                policy: Default::default(),
            }),
            false => {
                let d = denial(Reason::NodeNotAllowed, "nodes may not call this directly");
                Err(d.record(gate, None).await)
            }
        };
    }
    let policy = gate
        .reader
        .identity_policy(&identity)
        .map_err(crate::error::read)?
        .unwrap_or_default();
    if policy.revoked || gate.reader.serial_revoked(&serial).map_err(crate::error::read)? {
        // A revoked certificate does not authenticate: counted against the address.
        if let Some(until) = gate.denials.address_locked_until(source) {
            gate.denials.refuse_locked(&identity, source, &method).await;
            return Err(crate::error::locked_out(until).into());
        }
        let d = denial(Reason::Revoked, "certificate or identity revoked");
        return Err(d.record(gate, counts(Against::Address)).await);
    }
    // An authenticated caller is locked out by its identity alone.
    if let Some(until) = gate.denials.identity_locked_until(&identity) {
        gate.denials.refuse_locked(&identity, source, &method).await;
        return Err(crate::error::locked_out(until).into());
    }
    if !policy.allows_source(source) {
        let d = denial(Reason::SourceNotAllowed, "source address not allowed");
        return Err(d.record(gate, counts(Against::Identity)).await);
    }
    let bootstrap = gate.operators.contains(&identity);
    let allowed = rule
        .admits(|role| policy.cluster_roles.contains(&role) || (bootstrap && role == ClusterRole::Operator));
    if !allowed {
        let d = denial(Reason::NoClusterRole, "missing cluster role for this call");
        return Err(d.record(gate, counts(Against::Identity)).await);
    }
    let mut policy = policy;
    if bootstrap {
        policy.cluster_roles.insert(ClusterRole::Operator);
    }
    Ok(Principal {
        identity: identity.clone(),
        is_node,
        serial,
        source,
        key,
        policy,
    })
}

/// A call the access layer refuses.
struct Denial<'a> {
    identity: &'a str,
    source: Option<IpAddr>,
    method: &'a str,
    why: Reason,
    reason: &'static str,
}

impl Denial<'_> {
    /// Audits it — counted against `against`, or not at all — and builds the status.
    async fn record(self, gate: &Gate, against: Option<Against>) -> Status {
        match against {
            Some(against) => {
                gate.denials
                    .deny(self.identity, self.source, self.method, "-", self.reason, against)
                    .await
            }
            None => {
                let result = format!("{REFUSED}{}", self.reason);
                gate.denials
                    .refuse(self.identity, self.source, self.method, &result)
                    .await;
            }
        }
        ApiError::new(self.why, self.reason).into()
    }
}
