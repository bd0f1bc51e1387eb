//! The engine behind the [`Decoder`] interface, so `generate`, `ppl` and `eval` run on it unchanged.

use std::time::Instant;

use crate::config::ModelConfig;
use crate::decode::{check_rows, DecodeError, Decoder, TokenScore};
use crate::source::ModelFiles;
use crate::sparse::SparsityStats;

use super::engine::Engine;
use super::gpu::{Gpu, GpuError};
use super::kernels::Kernels;
use super::weights::Weights;
use crate::source::weights::Half;

fn engine_err(e: GpuError) -> DecodeError {
    DecodeError::Engine(e.0)
}

/// A dense decoder on the CUDA engine.
pub struct CudaDecoder {
    pub engine: Engine,
}

/// How the engine came up, for start-up reports.
#[derive(Debug, Clone)]
pub struct StartInfo {
    pub device: String,
    pub module_from_cache: bool,
    pub module_seconds: f64,
    pub upload_seconds: f64,
    pub weight_bytes: usize,
}

impl CudaDecoder {
    /// Open GPU `ordinal`, load the kernels and upload `files`' weights in `dt` (default: by the checkpoint's type).
    pub fn load(files: &ModelFiles, dt: Option<Half>, ordinal: usize, on_layer: impl FnMut(usize)) -> Result<(Self, StartInfo), GpuError> {
        let gpu = Gpu::new(ordinal)?;
        let k = Kernels::load(gpu.arch)?;
        let cfg = files.config.clone();
        let ck = files.checkpoint.as_ref();
        let first = crate::source::names::Table::new(&cfg, crate::source::names::Names::detect(cfg.family, |n| ck.contains(n)));
        let dt = match dt {
            Some(d) => d,
            None => {
                let name = first.tensors.first().map(|t| t.name.clone()).unwrap_or_default();
                Half::for_checkpoint(ck.meta(&name).map(|m| m.dtype).unwrap_or(crate::source::weights::DType::F16))
            }
        };
        let need = super::weights::total_weight_bytes(&cfg, 2);
        let (free, _) = gpu.mem_info()?;
        if need > free {
            return Err(GpuError(format!("the weights need {:.1} GB in {}, the GPU has {:.1} GB free", need as f64 / 1e9, dt.name(), free as f64 / 1e9)));
        }
        let t0 = Instant::now();
        let w = Weights::upload(&gpu, &cfg, ck, dt, on_layer)?;
        let upload_seconds = t0.elapsed().as_secs_f64();
        let info = StartInfo {
            device: gpu.name.clone(),
            module_from_cache: k.info.from_cache,
            module_seconds: k.info.seconds,
            upload_seconds,
            weight_bytes: need,
        };
        let engine = Engine::new(gpu, k, w, cfg)?;
        Ok((CudaDecoder { engine }, info))
    }

    /// Decode under `plan` from now on (see [`Engine::set_plan`] for what runs on the GPU).
    pub fn set_plan(&mut self, plan: &crate::sparse::Plan, art: &super::engine::GpuArtifacts<'_>) -> Result<(), GpuError> {
        self.engine.set_plan(plan, art)
    }

    pub fn from_engine(engine: Engine) -> Self {
        CudaDecoder { engine }
    }
}

impl Decoder for CudaDecoder {
    fn config(&self) -> &ModelConfig {
        &self.engine.ctx.cfg
    }

    fn len(&self) -> usize {
        self.engine.len
    }

    fn reset(&mut self) {
        self.engine.reset();
    }

    fn prefill(&mut self, rows: &[Vec<u32>], lens: Option<&[usize]>) -> Result<(), DecodeError> {
        let s = check_rows(&self.engine.ctx.cfg, self.engine.len, rows)?;
        let b = rows.len();
        let lens: Vec<usize> = match lens {
            Some(l) if l.len() != b || l.iter().any(|&n| n > s) => {
                return Err(DecodeError::Usage(format!("row lengths {l:?} do not fit {b} rows of {s} tokens")));
            }
            Some(l) => l.to_vec(),
            None => vec![s; b],
        };
        if self.engine.len > 0 {
            if let Some(last) = &self.engine.last {
                if last.rows != b {
                    return Err(DecodeError::Usage(format!("the cache holds {} rows, the forward has {b}", last.rows)));
                }
            }
        }
        let ids: Vec<i32> = rows.iter().flatten().map(|&t| t as i32).collect();
        if s == 1 && b <= super::launcher::GEMV_MAX_ROWS {
            self.engine.step(Some(&ids), b).map_err(engine_err)
        } else {
            self.engine.prefill(&ids, b, s, lens).map_err(engine_err)
        }
    }

    fn greedy(&mut self) -> Result<Vec<u32>, DecodeError> {
        self.engine.argmax().map_err(engine_err)
    }

    fn logits(&mut self) -> Result<Vec<Vec<f32>>, DecodeError> {
        self.engine.logits().map_err(engine_err)
    }

    fn position_logits(&mut self) -> Result<Vec<Vec<f32>>, DecodeError> {
        self.engine.position_logits().map_err(engine_err)
    }

    fn score(&mut self, targets: &[Vec<u32>]) -> Result<Vec<Vec<TokenScore>>, DecodeError> {
        let last = self.engine.last.clone().ok_or_else(|| DecodeError::Usage("no forward has run since the last reset".into()))?;
        let v = self.engine.ctx.cfg.vocab_size;
        if targets.len() != last.rows || targets.iter().any(|t| t.len() > last.seq) {
            return Err(DecodeError::Usage(format!("{} target rows for a forward of {} rows of {} positions", targets.len(), last.rows, last.seq)));
        }
        if let Some(&id) = targets.iter().flatten().find(|&&t| t as usize >= v) {
            return Err(DecodeError::TokenOutOfVocab { id, vocab: v });
        }
        let s = self.engine.score(targets).map_err(engine_err)?;
        Ok(s
            .into_iter()
            .zip(targets)
            .map(|(row, t)| row.into_iter().zip(t).map(|((lp, am), &id)| TokenScore { logprob: lp, argmax: am == id, top: am }).collect())
            .collect())
    }

    fn truncate(&mut self, len: usize) -> Result<(), DecodeError> {
        self.engine.truncate(len).map_err(|e| DecodeError::Usage(e.0))
    }

    fn fork(&mut self, n: usize) -> Result<(), DecodeError> {
        let rows = self.engine.last.as_ref().map_or(1, |l| l.rows);
        if rows != 1 || n == 0 {
            return Err(DecodeError::Usage(format!("fork needs a one-row cache and n >= 1 (cache has {rows} rows, n = {n})")));
        }
        self.engine.fork(n).map_err(engine_err)?;
        // Later forwards run n rows.
        self.engine.last = Some(super::engine::Last { rows: n, seq: 0, lens: vec![0; n], step_logits: false });
        Ok(())
    }

    /// Suspend (`true`) or resume the plan's sparse MLP (the dense passes of Sirius).
    fn set_dense(&mut self, dense: bool) {
        self.engine.set_dense(dense);
    }

    fn stats(&self) -> &SparsityStats {
        &self.engine.stats
    }

    fn take_stats(&mut self) -> SparsityStats {
        std::mem::take(&mut self.engine.stats)
    }
}
