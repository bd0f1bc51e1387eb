//! Hugging Face Hub access through hf-hub's cache layout (`$HF_HOME/hub`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// True when `HF_HUB_OFFLINE` asks for no network (hf-hub 0.5 does not read it itself).
pub fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on"))
}

/// Make sure config.json, tokenizer.json and the safetensors weights of `id` are in the local cache
/// (downloading what is missing unless offline) and return the snapshot directory holding them.
pub fn fetch(id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    let cache_dir = cache.path().display().to_string();
    if offline() {
        let get = |f: &str| {
            repo.get(f).ok_or_else(|| {
                Error::Hub(format!(
                    "{id}: `{f}` is not in the Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE=1 forbids downloading it"
                ))
            })
        };
        let config = get("config.json")?;
        get("tokenizer.json")?;
        if let Some(index) = repo.get("model.safetensors.index.json") {
            for shard in shard_names(&index)? {
                get(&shard)?;
            }
        } else {
            get("model.safetensors")?;
        }
        return Ok(config.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(format!("{id}: cannot start the Hub client: {e}")))?;
    let api_repo = api.model(id.to_string());
    let get = |f: &str| -> Result<PathBuf> {
        if let Some(p) = repo.get(f) {
            return Ok(p);
        }
        api_repo.get(f).map_err(|e| Error::Hub(format!("{id}: cannot download `{f}`: {e}")))
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    match get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&index)? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| Error::json(index, e))?;
    let mut v: Vec<String> = idx.weight_map.into_values().collect();
    v.sort();
    v.dedup();
    Ok(v)
}
