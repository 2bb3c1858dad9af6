//! `creditgate check --config FILE --against URL`: what a reload of FILE would change in the
//! gateway running at URL, from its `GET /admin/v1/config`.

use std::path::Path;

use crate::config::Config;
use crate::running;

use super::{AdminClient, CliError, Endpoint};

/// Fetches the running config and returns the report: one line per change (see
/// [`running::diff`]) between a header and a summary line.
pub fn against(file: &Path, config: &Config, endpoint: &Endpoint) -> Result<String, CliError> {
    let client = AdminClient::new(endpoint)?;
    let answer = super::block_on(async { client.get("/admin/v1/config").await })?;
    let running_config = answer
        .json
        .get("config")
        .ok_or_else(|| CliError::Invalid(format!("{}/admin/v1/config: the answer has no `config`", endpoint.url)))?;
    let running_hash = answer.json["hash"].as_str().unwrap_or("?");
    let loaded_at = answer.json["loaded_at"].as_str().unwrap_or("?");
    let file_hash = running::config_hash(config);
    let changes = running::diff(running_config, &running::redacted(config));

    let mut out = format!(
        "{} against the gateway at {} (running {running_hash}, loaded {loaded_at}):\n",
        file.display(),
        endpoint.url
    );
    for change in &changes {
        out.push_str(&format!("{change}\n"));
    }
    out.push_str(&match (changes.len(), file_hash == running_hash) {
        (0, true) => "no changes: the gateway runs this file's config\n".to_owned(),
        (0, false) => format!(
            "no visible changes, but the file's hash is {file_hash}: only redacted values (literal header \
             values, URL passwords or queries) differ\n"
        ),
        (1, _) => "1 change: a reload of this file would make it\n".to_owned(),
        (n, _) => format!("{n} changes: a reload of this file would make them\n"),
    });
    Ok(out)
}
