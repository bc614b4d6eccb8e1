//! The Template service's client.

use async_trait::async_trait;
use batch_domain::{TemplateId, TenantId};
use batch_ports::{SourceError, Template, TemplateSource};
use batch_proto::template::v1 as pb;
use batch_proto::template::v1::template_service_client::TemplateServiceClient;
use tonic::transport::Channel;

use super::{BadEndpoint, ChannelSettings, channel, source_error, with_deadline};
use batch_proto::json::from_struct;

/// Reads templates from the Template service. Wrap it in [`crate::cache::CachedTemplates`]
/// to cache them and to keep serving the last good template while the service is down.
#[derive(Debug, Clone)]
pub struct GrpcTemplates {
    client: TemplateServiceClient<Channel>,
    timeout: std::time::Duration,
}

impl GrpcTemplates {
    /// A client of the service at `settings.endpoint`.
    ///
    /// # Errors
    /// [`BadEndpoint`] for an endpoint that is not an address.
    pub fn new(settings: &ChannelSettings) -> Result<Self, BadEndpoint> {
        Ok(GrpcTemplates {
            client: TemplateServiceClient::new(channel(settings)?),
            timeout: settings.timeout,
        })
    }
}

#[async_trait]
impl TemplateSource for GrpcTemplates {
    async fn template(
        &self,
        tenant: &TenantId,
        id: &TemplateId,
        version: Option<u32>,
    ) -> Result<Template, SourceError> {
        let message = pb::GetTemplateRequest {
            template_id: id.to_string(),
            tenant_id: tenant.to_string(),
            version: version.unwrap_or(0),
        };
        let response = self
            .client
            .clone()
            .get_template(with_deadline(message, self.timeout))
            .await
            .map_err(|status| source_error("template service", &status))?
            .into_inner();
        let template = response.template.ok_or_else(|| {
            SourceError::Unexpected(format!(
                "template service: no template in the answer for {id}"
            ))
        })?;
        Ok(Template {
            id: TemplateId::parse(&template.template_id).map_err(|e| {
                SourceError::Unexpected(format!("template service: template id: {e}"))
            })?,
            version: template.version,
            body: template.body,
            parameter_defaults: template
                .parameter_defaults
                .as_ref()
                .map(from_struct)
                .unwrap_or_default(),
        })
    }
}
