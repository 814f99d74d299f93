//! S3 and S3-compatible servers (`s3://bucket/prefix`) through aws-sdk-s3.
//!
//! The SDK's own retries are off: [`super::retry::Retry`] decides. Errors are sorted into not-found,
//! permanent (credentials, missing bucket, refused request) and transient (5xx, SlowDown, timeouts,
//! dropped connections). With `checksums = "when_required"` no checksum headers are sent, which many
//! S3-compatible servers need; with `always`, every part carries its SHA-256 for the server to check.
//! Either way the manifest's own SHA-256 of each object is what proves integrity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockMode,
    ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{ObjectInfo, ObjectReader, ObjectStore, PendingUpload, StoreError, Upload};
use crate::error::Error;
use crate::policy::{ChecksumMode, LockMode, S3Config};
use crate::repo::layout;

/// A repository in an S3 bucket under a prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    checksums: ChecksumMode,
    storage_class: Option<StorageClass>,
    object_lock: Option<(LockMode, u32)>,
    /// Server-side encryption asked for on each write, and the KMS key.
    sse: Option<(ServerSideEncryption, Option<String>)>,
}

/// Builds an S3 client for `config` with the default credential chain (environment, profile, web
/// identity / IRSA, container and instance metadata).
pub async fn client(config: &S3Config) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .operation_attempt_timeout(Duration::from_secs(600))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http.clone())
        .region(Region::new(config.region.clone()))
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .timeout_config(timeouts);
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(profile) = &config.credentials_profile {
        // The profile's own credentials, never the environment's: a copy in another account
        // must not write with the primary's keys.
        let provider = aws_config::provider_config::ProviderConfig::without_region()
            .with_http_client(http.clone())
            .with_region(Some(Region::new(config.region.clone())));
        let credentials = aws_config::profile::ProfileFileCredentialsProvider::builder()
            .configure(&provider)
            .profile_name(profile)
            .build();
        loader = loader
            .profile_name(profile)
            .credentials_provider(credentials);
    }
    let shared = loader.load().await;
    let (request, response) = match config.checksums {
        ChecksumMode::WhenRequired => (
            RequestChecksumCalculation::WhenRequired,
            ResponseChecksumValidation::WhenRequired,
        ),
        ChecksumMode::Always => (
            RequestChecksumCalculation::WhenSupported,
            ResponseChecksumValidation::WhenSupported,
        ),
    };
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(config.force_path_style)
        .request_checksum_calculation(request)
        .response_checksum_validation(response)
        .build();
    Client::from_conf(conf)
}

impl S3Store {
    /// Connects (lazily) to the bucket `config` names.
    pub async fn new(config: &S3Config) -> Result<Self, Error> {
        Ok(S3Store {
            client: client(config).await,
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            endpoint: config.endpoint.clone(),
            checksums: config.checksums,
            storage_class: config.storage_class.as_deref().map(StorageClass::from),
            object_lock: config.object_lock,
            sse: config.server_side_encryption.clone().map(|(mode, key)| {
                let mode = match mode {
                    crate::policy::ServerSideEncryption::AwsKms => ServerSideEncryption::AwsKms,
                    crate::policy::ServerSideEncryption::Aes256 => ServerSideEncryption::Aes256,
                };
                (mode, key)
            }),
        })
    }

    fn sse_mode(&self) -> Option<ServerSideEncryption> {
        self.sse.as_ref().map(|(mode, _)| mode.clone())
    }

    fn sse_key(&self) -> Option<String> {
        self.sse.as_ref().and_then(|(_, key)| key.clone())
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// What a listing says of one object (keyless entries are skipped).
    fn info(&self, o: &aws_sdk_s3::types::Object) -> Option<ObjectInfo> {
        Some(ObjectInfo {
            key: self.relative(o.key()?).to_string(),
            size: o.size().unwrap_or(0).max(0) as u64,
            etag: o.e_tag().map(|t| t.trim_matches('"').to_string()),
            modified: o
                .last_modified()
                .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
        })
    }

    fn relative<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|k| k.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    async fn get_object(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(String, aws_sdk_s3::operation::get_object::GetObjectOutput), StoreError> {
        let full = self.full_key(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify(op, &full, e))?;
        Ok((full, out))
    }

    /// Checksums go with every upload when asked for, and when Object Lock needs them (S3
    /// requires an integrity header on writes that carry a retention).
    fn sends_checksums(&self) -> bool {
        self.checksums == ChecksumMode::Always || self.object_lock.is_some()
    }

    fn sha256_b64(&self, data: &[u8]) -> Option<String> {
        self.sends_checksums()
            .then(|| aws_smithy_types::base64::encode(Sha256::digest(data)))
    }

    /// The retention to set on `key`: what restores read (see
    /// [`layout::locked_by_retention`]); leases, claims, probes and superseded partial WAL
    /// objects must stay deletable.
    fn lock_for(&self, key: &str) -> Option<(ObjectLockMode, aws_smithy_types::DateTime)> {
        let (mode, days) = self.object_lock?;
        if !layout::locked_by_retention(key) {
            return None;
        }
        let until = chrono::Utc::now() + chrono::Duration::days(i64::from(days));
        let mode = match mode {
            LockMode::Governance => ObjectLockMode::Governance,
            LockMode::Compliance => ObjectLockMode::Compliance,
        };
        Some((
            mode,
            aws_smithy_types::DateTime::from_secs(until.timestamp()),
        ))
    }
}

/// Sorts an SDK error into not-found, permanent and transient.
fn classify<E>(
    op: &'static str,
    key: &str,
    err: SdkError<E, aws_smithy_runtime_api_http::HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // A service error reads best as its code, message and status; the full context (which for
    // these dumps the raw response) only for transport errors, where it holds the cause.
    let message = match &err {
        SdkError::ServiceError(se) => format!(
            "{} (HTTP {}): {}",
            se.err().code().unwrap_or("unknown error"),
            se.raw().status().as_u16(),
            se.err().message().unwrap_or("no message")
        ),
        _ => DisplayErrorContext(&err).to_string(),
    };
    match &err {
        // No credentials could be loaded (a profile that is not there, a web identity refused):
        // the request was never sent, and sending it again will not load them.
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_)
            if message.contains("credentials error") || message.contains("no credentials") =>
        {
            StoreError::Permanent {
                op,
                key: key.to_string(),
                message,
                credential: true,
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::transient(op, key, message)
        }
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("");
            match (status, code) {
                (_, "NoSuchBucket") => StoreError::permanent(
                    op,
                    key,
                    "the bucket does not exist (NoSuchBucket): create it or fix repository.url",
                ),
                (404, _) | (_, "NoSuchKey") | (_, "NotFound") | (_, "NoSuchUpload") => {
                    StoreError::NotFound {
                        key: key.to_string(),
                    }
                }
                (401 | 403, _)
                | (
                    _,
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "InvalidToken",
                ) => StoreError::Permanent {
                    op,
                    key: key.to_string(),
                    message,
                    credential: true,
                },
                // The server does not have this operation (S3-compatible servers without
                // ListMultipartUploads): asking again will not give it one.
                (501, _) | (_, "NotImplemented") => StoreError::permanent(op, key, message),
                (500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError") => {
                    StoreError::transient(op, key, message)
                }
                _ => StoreError::permanent(op, key, message),
            }
        }
        _ => StoreError::permanent(op, key, message),
    }
}

/// An operation where a missing object (or upload) is a normal answer: `None` instead of an error.
fn missing_is<T>(r: Result<T, StoreError>, missing: T) -> Result<T, StoreError> {
    match r {
        Err(StoreError::NotFound { .. }) => Ok(missing),
        other => other,
    }
}

mod aws_smithy_runtime_api_http {
    pub use aws_sdk_s3::config::http::HttpResponse;
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        let mut s = format!("s3://{}/{}", self.bucket, self.prefix);
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" at {e}"));
        }
        s
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .set_checksum_sha256(self.sha256_b64(&data))
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse_mode())
            .set_ssekms_key_id(self.sse_key())
            .body(ByteStream::from(data));
        if self.sends_checksums() {
            req = req.checksum_algorithm(ChecksumAlgorithm::Sha256);
        }
        if let Some((mode, until)) = self.lock_for(key) {
            req = req
                .object_lock_mode(mode)
                .object_lock_retain_until_date(until);
        }
        req.send().await.map_err(|e| classify("put", &full, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let (full, out) = self.get_object("get", key).await?;
        let body = out.body.collect().await.map_err(|e| {
            StoreError::transient("get", &full, DisplayErrorContext(&e).to_string())
        })?;
        Ok(body.into_bytes())
    }

    async fn open(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let (_, out) = self.get_object("open", key).await?;
        Ok(Box::pin(out.body.into_async_read()))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let full = self.full_key(key);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let sent = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .range(format!("bytes={offset}-{}", offset + len - 1))
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            // A range that starts past the object's end: nothing there.
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => {
                return Ok(Bytes::new())
            }
            Err(e) => return Err(classify("get", &full, e)),
        };
        // Into one buffer of the range's size, chunk by chunk: collecting first would hold the
        // range twice.
        let mut body = out.body;
        let mut buf = bytes::BytesMut::with_capacity(len as usize);
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| StoreError::transient("get", &full, DisplayErrorContext(&e).to_string()))?
        {
            if (buf.len() + chunk.len()) as u64 > len {
                return Err(StoreError::permanent(
                    "get",
                    &full,
                    "the server answered a ranged GET with more than the range (it ignored Range); lifeboat needs an S3 server that honours it",
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let full = self.full_key(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length.unwrap_or(0).max(0) as u64)),
            Err(e) => missing_is(Err(classify("head", &full, e)), None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let full = self.full_key(prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("list", &full, e))?;
            out.extend(page.contents().iter().filter_map(|o| self.info(o)));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        let full = self.full_key(prefix);
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .set_start_after(start_after.map(|k| self.full_key(k)))
            .max_keys(super::LIST_PAGE as i32)
            .send()
            .await
            .map_err(|e| classify("list", &full, e))?;
        let out = page
            .contents()
            .iter()
            .filter_map(|o| self.info(o))
            .collect();
        Ok((out, page.is_truncated().unwrap_or(false)))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key);
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => missing_is(Err(classify("delete", &full, e)), ()),
        }
    }

    async fn start_upload(&self, key: &str) -> Result<Arc<dyn Upload>, StoreError> {
        let full = self.full_key(key);
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .set_storage_class(self.storage_class.clone())
            .set_server_side_encryption(self.sse_mode())
            .set_ssekms_key_id(self.sse_key());
        if self.sends_checksums() {
            req = req.checksum_algorithm(ChecksumAlgorithm::Sha256);
        }
        if let Some((mode, until)) = self.lock_for(key) {
            req = req
                .object_lock_mode(mode)
                .object_lock_retain_until_date(until);
        }
        let out = req
            .send()
            .await
            .map_err(|e| classify("create multipart upload", &full, e))?;
        let upload_id = out.upload_id().map(str::to_string).ok_or_else(|| {
            StoreError::permanent(
                "create multipart upload",
                &full,
                "the server returned no upload id",
            )
        })?;
        Ok(Arc::new(S3Upload {
            store: self.clone(),
            key: full,
            upload_id,
            parts: Mutex::new(Vec::new()),
        }))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StoreError> {
        let full = self.full_key(key);
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .if_none_match("*")
            .set_server_side_encryption(self.sse_mode())
            .set_ssekms_key_id(self.sse_key())
            .body(ByteStream::from(data))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(se)) if matches!(se.raw().status().as_u16(), 409 | 412) => {
                Ok(false)
            }
            Err(e) => Err(classify("put if absent", &full, e)),
        }
    }

    async fn lock_enabled(&self) -> Result<Option<bool>, StoreError> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => Ok(Some(
                out.object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| e.as_str() == "Enabled"),
            )),
            Err(SdkError::ServiceError(se))
                if se.err().code() == Some("ObjectLockConfigurationNotFoundError") =>
            {
                Ok(Some(false))
            }
            Err(e) => Err(classify("get object lock configuration", &self.bucket, e)),
        }
    }

    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        let full = self.full_key(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_retain_until_date()
                .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t.secs(), 0))
                .filter(|t| *t > chrono::Utc::now())),
            Err(e) => missing_is(Err(classify("head", &full, e)), None),
        }
    }

    async fn abort_pending(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        let full = self.full_key(&upload.key);
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => missing_is(Err(classify("abort multipart upload", &full, e)), ()),
        }
    }

    async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError> {
        let prefix = self.full_key("");
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .send()
            .await
            .map_err(|e| classify("list multipart uploads", &prefix, e))?;
        Ok(out
            .uploads()
            .iter()
            .filter_map(|u| {
                Some(PendingUpload {
                    key: self.relative(u.key()?).to_string(),
                    upload_id: u.upload_id()?.to_string(),
                    initiated: u.initiated().and_then(|t| {
                        chrono::DateTime::<chrono::Utc>::from_timestamp(t.secs(), t.subsec_nanos())
                    }),
                })
            })
            .collect())
    }
}

/// A multipart upload in progress.
#[derive(Debug)]
struct S3Upload {
    store: S3Store,
    key: String,
    upload_id: String,
    parts: Mutex<Vec<CompletedPart>>,
}

#[async_trait]
impl Upload for S3Upload {
    fn key(&self) -> &str {
        &self.key
    }

    async fn put_part(&self, number: u32, _offset: u64, data: Bytes) -> Result<(), StoreError> {
        let checksum = self.store.sha256_b64(&data);
        let out = self
            .store
            .client
            .upload_part()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number as i32)
            .set_checksum_sha256(checksum.clone())
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify("upload part", &self.key, e))?;
        let part = CompletedPart::builder()
            .part_number(number as i32)
            .set_e_tag(out.e_tag().map(str::to_string))
            .set_checksum_sha256(checksum)
            .build();
        self.parts
            .lock()
            .map_err(|_| StoreError::permanent("upload part", &self.key, "part list poisoned"))?
            .push(part);
        Ok(())
    }

    async fn complete(&self) -> Result<(), StoreError> {
        let mut parts = self
            .parts
            .lock()
            .map_err(|_| StoreError::permanent("complete upload", &self.key, "part list poisoned"))?
            .clone();
        parts.sort_by_key(|p| p.part_number());
        self.store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("complete multipart upload", &self.key, e))?;
        Ok(())
    }

    async fn abort(&self) -> Result<(), StoreError> {
        match self
            .store
            .client
            .abort_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => missing_is(Err(classify("abort multipart upload", &self.key, e)), ()),
        }
    }
}
