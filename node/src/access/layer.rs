//! The tower layer in front of every client-listener service.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

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
    let counted = rule.is_none_or(|r| !r.probe);
    let Some((cert_identity, serial)) = leaf.as_deref().and_then(identity_of) else {
        return Err(deny(
            gate,
            counted,
            "-",
            addr,
            &method,
            Reason::CertificateWithoutIdentity,
            "no client certificate identity",
        )
        .await);
    };
    let (identity, is_node, serial, source) = match cert_identity {
        CertIdentity::Node(id) => match header(req, ON_BEHALF_OF) {
            Some(user) => (
                user.to_string(),
                false,
                header(req, ON_BEHALF_SERIAL).unwrap_or("").to_string(),
                header(req, ON_BEHALF_SOURCE).and_then(|s| s.parse::<IpAddr>().ok()),
            ),
            None => (format!("node:{id}"), true, serial, addr),
        },
        CertIdentity::User(u) => (u, false, serial, addr),
    };
    // A method without a rule is not served on this port (the peer protocol
    // is served only on the Raft port); asking for it is no denial.
    let Some(rule) = rule else {
        return Err(crate::error::not_served(path));
    };
    if gate.denials.is_locked(Some(&identity), source) {
        gate.denials.refuse_locked(&identity, source, &method).await;
        return Err(ApiError::new(Reason::LockedOut, "locked out after repeated failures").into());
    }
    if is_node {
        return match rule.nodes {
            true => Ok(Principal {
                identity,
                is_node,
                serial,
                source,
                policy: Default::default(),
            }),
            false => Err(deny(
                gate,
                counted,
                &identity,
                source,
                &method,
                Reason::NodeNotAllowed,
                "nodes may not call this directly",
            )
            .await),
        };
    }
    let policy = gate
        .reader
        .identity_policy(&identity)
        .map_err(crate::error::read)?
        .unwrap_or_default();
    if policy.revoked || gate.reader.serial_revoked(&serial).map_err(crate::error::read)? {
        let reason = "certificate or identity revoked";
        return Err(deny(gate, counted, &identity, source, &method, Reason::Revoked, reason).await);
    }
    if !policy.allows_source(source) {
        return Err(deny(
            gate,
            counted,
            &identity,
            source,
            &method,
            Reason::SourceNotAllowed,
            "source address not allowed",
        )
        .await);
    }
    let bootstrap = gate.operators.contains(&identity);
    let allowed = rule
        .admits(|role| policy.cluster_roles.contains(&role) || (bootstrap && role == ClusterRole::Operator));
    if !allowed {
        return Err(deny(
            gate,
            counted,
            &identity,
            source,
            &method,
            Reason::NoClusterRole,
            "missing cluster role for this call",
        )
        .await);
    }
    let mut policy = policy;
    if bootstrap {
        policy.cluster_roles.insert(ClusterRole::Operator);
    }
    Ok(Principal {
        identity,
        is_node,
        serial,
        source,
        policy,
    })
}

/// Audits a denial, counts it towards lockout when `counted`, and builds the status.
async fn deny(
    gate: &Gate,
    counted: bool,
    identity: &str,
    source: Option<IpAddr>,
    method: &str,
    why: Reason,
    reason: &str,
) -> Status {
    if !counted {
        let result = format!("{REFUSED}{reason}");
        gate.denials.refuse(identity, source, method, &result).await;
        return ApiError::new(why, reason).with("locked_out", false).into();
    }
    let locked = gate.denials.deny(identity, source, method, "-", reason).await;
    let message = match locked {
        true => format!("{reason}; now locked out"),
        false => reason.to_string(),
    };
    ApiError::new(why, message).with("locked_out", locked).into()
}
