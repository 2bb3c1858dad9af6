//! Extractors whose rejections are SPEC §6 errors (axum's own answer in plain text).

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::GatewayError;

/// A JSON request body; malformed or mistyped JSON is a 400 `bad_request` naming the problem.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = GatewayError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, GatewayError> {
        let bytes = crate::stack::read_body(req.into_body(), 64 * 1024).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| GatewayError::BadRequest(format!("The request body is not valid JSON for this call ({e}).")))
    }
}
