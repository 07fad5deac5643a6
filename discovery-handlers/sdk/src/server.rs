//! Serves a [`DiscoveryHandler`] as a `v0.DiscoveryHandler` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use verge_device_plugin_proto::v0::discovery_handler_server::{
    DiscoveryHandler as DiscoveryHandlerRpc, DiscoveryHandlerServer,
};
use verge_device_plugin_proto::v0::{DiscoverRequest, DiscoverResponse};

use crate::DiscoveryHandler;

/// The gRPC face of a handler.
pub struct DiscoveryService {
    handler: Arc<dyn DiscoveryHandler>,
}

impl DiscoveryService {
    /// Wraps a handler.
    pub fn new(handler: Arc<dyn DiscoveryHandler>) -> Self {
        Self { handler }
    }

    /// The tonic server for it.
    pub fn into_server(self) -> DiscoveryHandlerServer<Self> {
        DiscoveryHandlerServer::new(self)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoverResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryHandlerRpc for DiscoveryService {
    type DiscoverStream = ResponseStream;

    async fn discover(
        &self,
        request: Request<DiscoverRequest>,
    ) -> Result<Response<Self::DiscoverStream>, Status> {
        let stream = self
            .handler
            .discover(request.into_inner().into())
            .await
            .map_err(|e| {
                tracing::warn!(handler = self.handler.name(), error = %e, "discover refused");
                Status::from(e)
            })?;
        // Only changed lists go on the wire: the agent diffs every message, so
        // a repeat would cost it work and tell it nothing.
        let mut last: Option<DiscoverResponse> = None;
        let deduped = stream.filter_map(move |item| {
            let out = match item {
                Ok(update) => {
                    let response = DiscoverResponse::from(update);
                    if last.as_ref() == Some(&response) {
                        None
                    } else {
                        last = Some(response.clone());
                        Some(Ok(response))
                    }
                }
                Err(e) => Some(Err(Status::from(e))),
            };
            futures::future::ready(out)
        });
        Ok(Response::new(Box::pin(deduped)))
    }
}
