//! `mailvault.v1.Audit`: reading and verifying the hash-chained audit log.

use std::sync::Arc;

use mailvault_proto::v1::audit_server::Audit;
use mailvault_proto::v1::*;
use tonic::{Request, Response, Status};

use super::operator::{hex, record};
use crate::ctx::Ctx;
use crate::error;
use crate::forward::principal_of;

/// The audit service.
#[derive(Clone)]
pub struct AuditService {
    ctx: Arc<Ctx>,
}

impl AuditService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> AuditService {
        AuditService { ctx }
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let p = principal_of(&req);
        let r = req.into_inner();
        record(&self.ctx, p.as_ref(), "ListAudit", format!("from {}", r.from_seq)).await?;
        self.ctx.read_barrier().await?;
        let limit = match r.limit {
            0 => 1000,
            n => n.min(10_000),
        } as usize;
        let records = self
            .ctx
            .reader
            .audit_records(r.from_seq.max(1), limit)
            .map_err(error::read)?
            .into_iter()
            .map(|r| AuditRecord {
                seq: r.seq,
                time_ms: r.event.time_ms,
                identity: r.event.identity,
                source: r.event.source,
                action: r.event.action,
                target: r.event.target,
                result: r.event.result,
                node: r.event.node,
                prev_hash: hex(&r.prev_hash),
                hash: hex(&r.hash),
            })
            .collect();
        let head_seq = self.ctx.reader.audit_head().map_err(error::read)?.seq;
        Ok(Response::new(ListAuditResponse { records, head_seq }))
    }

    async fn verify_audit(
        &self,
        req: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        let p = principal_of(&req);
        record(&self.ctx, p.as_ref(), "VerifyAudit", "-".into()).await?;
        let head = self.ctx.reader.audit_head().map_err(error::read)?;
        let result = self.ctx.reader.verify_audit().map_err(error::read)?;
        Ok(Response::new(match result {
            Ok(n) => VerifyAuditResponse {
                ok: true,
                records: n,
                error: String::new(),
                head_hash: hex(&head.hash),
            },
            Err(e) => VerifyAuditResponse {
                ok: false,
                records: head.seq,
                error: e.to_string(),
                head_hash: hex(&head.hash),
            },
        }))
    }
}
