//! `mailvault.v1.Tenants`: tenants and their data keys.

use std::sync::Arc;

use mailvault_proto::v1::tenants_client::TenantsClient;
use mailvault_proto::v1::tenants_server::Tenants;
use mailvault_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::operator::record;
use crate::ctx::Ctx;
use crate::error;
use crate::forward::route_write;
use crate::names;
use crate::state::command::{Command, CommandResult};

/// The tenants service.
#[derive(Clone)]
pub struct TenantsService {
    ctx: Arc<Ctx>,
}

impl TenantsService {
    /// A service over the node context.
    pub fn new(ctx: Arc<Ctx>) -> TenantsService {
        TenantsService { ctx }
    }

    /// A client of this service on the leader, to forward a write over `ch`.
    fn client(&self, ch: Channel) -> TenantsClient<Channel> {
        TenantsClient::new(ch)
    }
}

#[tonic::async_trait]
impl Tenants for TenantsService {
    async fn create_tenant(
        &self,
        req: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        route_write!(self, req, p, create_tenant);
        let r = req.into_inner();
        names::tenant(&r.tenant).map_err(error::name)?;
        record(&self.ctx, p.as_ref(), "CreateTenant", r.tenant.clone()).await?;
        let key = self.ctx.keyring.generate(&r.tenant, 1).map_err(error::crypto)?;
        let cmd = Command::CreateTenant {
            tenant: r.tenant,
            key,
        };
        match self.ctx.proposer.propose(cmd).await.map_err(error::propose)? {
            CommandResult::Refused(refusal) => Err(error::refusal(refusal).into()),
            _ => Ok(Response::new(CreateTenantResponse { key_version: 1 })),
        }
    }
}
