//! Reading request bodies: the extractors of the customer and admin APIs, whose rejections are
//! SPEC §6 errors (axum's own answer is plain text), and the capped whole-body read the proxy
//! path uses for pricing. Depends on nothing of the request path, so the API and the stack can
//! both use it.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::GatewayError;
use crate::state::AppState;

/// A JSON object request body; malformed or mistyped JSON is a 400 `bad_request` naming the problem.
pub struct JsonBody<T>(pub T);

/// Most an API body may hold: 64 KiB, or `server.max_body_bytes` when that is less.
const API_BODY_MAX: usize = 64 * 1024;

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = GatewayError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, GatewayError> {
        let limit = API_BODY_MAX.min(state.runtime.load().config.server.max_body_bytes);
        let bytes = read_body(req.into_body(), limit).await?;
        json_object(&bytes).map(JsonBody)
    }
}

/// A path parameter. One that cannot be read (not UTF-8 once decoded, say) is a 400
/// `bad_request` with the JSON error body (SPEC §6), not axum's plain-text answer.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> axum::extract::FromRequestParts<S> for PathParam<T> {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, GatewayError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParam(v)),
            Err(e) => Err(GatewayError::BadRequest(format!("The request path is not valid ({}).", e.body_text()))),
        }
    }
}

/// Reads `T` from a JSON object. Only from an object: serde would also read a struct from an
/// array of its field values in order (`["acme", "pro"]` as `{"id": "acme", "plan": "pro"}`, and
/// `[]` as a PATCH that changes nothing), a form no client means and the API document does not allow.
fn json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(GatewayError::BadRequest("The request body must be a JSON object.".into()));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| GatewayError::BadRequest(format!("The request body is not valid JSON for this call ({e}).")))
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    // A declared length (`Content-Length`) over the limit is refused before a byte is read.
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let failed = |e: &(dyn std::error::Error + 'static)| {
        if crate::error::cause_ref::<http_body_util::LengthLimitError>(e).is_some() {
            return GatewayError::PayloadTooLarge { limit };
        }
        if crate::error::cause_ref::<crate::listener::BodyTimeout>(e).is_some() {
            return GatewayError::RequestTimeout;
        }
        GatewayError::BadRequest("The request body could not be read.".into())
    };
    // What `axum::body::to_bytes` does, without its collection for the usual body of one frame:
    // that frame's bytes are the body, as they are; only a second frame starts a copy.
    let mut body = http_body_util::Limited::new(body, limit);
    let (mut first, mut joined) = (Bytes::new(), None::<bytes::BytesMut>);
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let frame = frame.map_err(|e| failed(&*e))?;
        // Trailers are not part of the bytes.
        let Ok(data) = frame.into_data() else { continue };
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = bytes::BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, bytes::BytesMut::freeze))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Update {
        plan: Option<String>,
        email: Option<String>,
    }

    #[tokio::test]
    async fn a_body_read_whole_is_its_frames_joined_and_capped() {
        let frames = |parts: &[&'static str]| {
            let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> =
                parts.iter().map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes())))).collect();
            Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
        };
        for parts in [&[][..], &[""], &["{\"a\":1}"], &["", "{\"a\"", ":1}"], &["{", "", "\"a\"", ":1}"]] {
            assert_eq!(read_body(frames(parts), 64).await.unwrap(), parts.concat(), "{parts:?}");
        }
        let e = read_body(frames(&["12345", "67890"]), 8).await.unwrap_err();
        assert!(matches!(e, GatewayError::PayloadTooLarge { limit: 8 }), "{e:?}");
        assert_eq!(read_body(frames(&["1234", "5678"]), 8).await.unwrap(), "12345678");
    }

    #[test]
    fn only_a_json_object_is_a_body() {
        assert!(json_object::<Update>(b" {\"plan\": \"pro\"}").is_ok());
        for body in [&b"[null, null]"[..], b"[\"pro\"]", b"[]", b"null", b"\"pro\"", b"", b"  "] {
            let e = json_object::<Update>(body).unwrap_err();
            assert_eq!(e.code(), crate::error::ErrorCode::BadRequest, "{}", String::from_utf8_lossy(body));
        }
    }
}
