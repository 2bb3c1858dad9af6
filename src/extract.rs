//! Reading request bodies: the extractors of the customer and admin APIs, whose rejections are
//! SPEC §6 errors (axum's own answer is plain text), and the capped whole-body read the proxy
//! path uses for pricing. Depends on nothing of the request path, so the API and the stack can
//! both use it.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::GatewayError;

/// A JSON request body; malformed or mistyped JSON is a 400 `bad_request` naming the problem.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = GatewayError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, GatewayError> {
        let bytes = read_body(req.into_body(), 64 * 1024).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| GatewayError::BadRequest(format!("The request body is not valid JSON for this call ({e}).")))
    }
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if crate::error::cause_ref::<http_body_util::LengthLimitError>(&e).is_some() {
            return GatewayError::PayloadTooLarge { limit };
        }
        if crate::error::cause_ref::<crate::listener::BodyTimeout>(&e).is_some() {
            return GatewayError::RequestTimeout;
        }
        GatewayError::BadRequest("The request body could not be read.".into())
    })
}
