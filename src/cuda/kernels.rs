//! Our kernels (`kernels/*.cu`, embedded in the binary) compiled by NVRTC for the GPU's architecture, once: as
//! several programs ([`PARTS`]) compiled on parallel threads (the GEMV's instantiations alone are most of the
//! work), each cubin cached on disk under its source's hash, so a later process loads them in milliseconds.
//! Nothing compiled is committed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::time::Instant;

use cudarc::driver::{result, sys};
use cudarc::nvrtc::sys as nvrtc;

use super::gpu::{Ctx, GpuError, GpuResult};

/// The sources, prelude first, in the order NVRTC sees them.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("embed.cu", include_str!("../../kernels/embed.cu")),
    ("norm.cu", include_str!("../../kernels/norm.cu")),
    ("gemv.cu", include_str!("../../kernels/gemv.cu")),
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    ("logits.cu", include_str!("../../kernels/logits.cu")),
    ("sparse.cu", include_str!("../../kernels/sparse.cu")),
    ("select.cu", include_str!("../../kernels/select.cu")),
    ("qscore.cu", include_str!("../../kernels/qscore.cu")),
    ("predict.cu", include_str!("../../kernels/predict.cu")),
    ("mma.cu", include_str!("../../kernels/mma.cu")),
    ("mlp.cu", include_str!("../../kernels/mlp.cu")),
];

/// The NVRTC programs: the files each one sees (the prelude first) and its `DJ_PART` (which share of the GEMV
/// instantiations at the end of kernels/gemv.cu it compiles; other files' kernels go to the parts listing them).
pub const PARTS: &[(&[&str], i32)] = &[
    (&["common.cuh", "gemv.cu"], 0),
    (&["common.cuh", "gemv.cu"], 1),
    (&["common.cuh", "gemv.cu"], 2),
    (&["common.cuh", "gemv.cu"], 3),
    (&["common.cuh", "gemv.cu"], 4),
    (&["common.cuh", "gemv.cu"], 5),
    (&["common.cuh", "gemv.cu"], 6),
    (&["common.cuh", "gemv.cu"], 7),
    (&["common.cuh", "gemv.cu"], 8),
    (&["common.cuh", "gemv.cu"], 9),
    (&["common.cuh", "embed.cu", "norm.cu", "logits.cu", "select.cu"], 10),
    (&["common.cuh", "attention.cu"], 11),
    (&["common.cuh", "sparse.cu", "predict.cu", "mlp.cu"], 12),
    (&["common.cuh", "gemv.cu", "qscore.cu"], 13),
    (&["common.cuh", "gemv.cu", "mma.cu"], 14),
];

/// The source NVRTC compiles for part `i` of [`PARTS`].
pub fn part_source(i: usize) -> String {
    let (files, _) = PARTS[i];
    files
        .iter()
        .map(|f| {
            let s = SOURCES.iter().find(|(n, _)| n == f).map_or("", |(_, s)| *s);
            format!("// ---- {f}\n{s}\n")
        })
        .collect()
}

/// How the module was obtained, for start-up reports.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    pub cache_file: PathBuf,
    pub from_cache: bool,
    pub seconds: f64,
}

/// The loaded modules (one per part) and a name -> function table.
pub struct Kernels {
    modules: Vec<sys::CUmodule>,
    funcs: RefCell<HashMap<String, sys::CUfunction>>,
    pub info: ModuleInfo,
}

fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `$DEJAVU_CACHE`, else `$XDG_CACHE_HOME/dejavu`, else `~/.cache/dejavu`, else the temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEJAVU_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("dejavu");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("dejavu");
    }
    std::env::temp_dir().join("dejavu")
}

fn options(arch: (i32, i32), part: i32) -> Vec<String> {
    vec![format!("--gpu-architecture=sm_{}{}", arch.0, arch.1), "-default-device".into(), "--std=c++17".into(), format!("-DDJ_PART={part}")]
}

fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    unsafe {
        let _ = nvrtc::nvrtcVersion(&mut a, &mut b);
    }
    (a, b)
}

/// Compile part `part` of [`PARTS`] to a cubin for `arch` (with `ptx`, to PTX text instead).
pub fn compile(arch: (i32, i32), part: usize, ptx: bool) -> GpuResult<Vec<u8>> {
    let src = part_source(part);
    let csrc = CString::new(src).map_err(|_| GpuError::new("kernel source holds a NUL byte"))?;
    let nv = |r: nvrtc::nvrtcResult, what: &str| -> GpuResult<()> {
        if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(GpuError(format!("NVRTC: {what}: {r:?}")))
        }
    };
    let prog = cudarc::nvrtc::result::create_program(&csrc, Some(c"dejavu_kernels.cu"))
        .map_err(|e| GpuError(format!("NVRTC: create program: {e:?}")))?;
    let opts = options(arch, PARTS[part].1);
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    let out = (|| {
        if let Err(e) = compiled {
            let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }.unwrap_or_default();
            let log: String = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
            return Err(GpuError(format!("NVRTC could not compile the kernels for sm_{}{} ({e:?}):\n{log}", arch.0, arch.1)));
        }
        let mut size = 0usize;
        if ptx {
            nv(unsafe { nvrtc::nvrtcGetPTXSize(prog, &mut size) }, "get PTX size")?;
            let mut buf = vec![0u8; size];
            nv(unsafe { nvrtc::nvrtcGetPTX(prog, buf.as_mut_ptr() as *mut c_char) }, "get PTX")?;
            return Ok(buf);
        }
        nv(unsafe { nvrtc::nvrtcGetCUBINSize(prog, &mut size) }, "get cubin size")?;
        let mut buf = vec![0u8; size];
        nv(unsafe { nvrtc::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }, "get cubin")?;
        Ok(buf)
    })();
    unsafe {
        let _ = cudarc::nvrtc::result::destroy_program(prog);
    }
    out
}

impl Kernels {
    /// Load the modules for `arch` from the disk cache, compiling (and caching) the missing parts first, in
    /// parallel.
    pub fn load(arch: (i32, i32)) -> GpuResult<Self> {
        let t0 = Instant::now();
        let files: Vec<PathBuf> = (0..PARTS.len()).map(|i| part_cache_file(arch, i)).collect();
        let cached: Vec<Option<Vec<u8>>> = files.iter().map(|f| std::fs::read(f).ok().filter(|b| !b.is_empty())).collect();
        let from_cache = cached.iter().all(Option::is_some);
        let cubins: Vec<Vec<u8>> = compile_parts(arch, cached, false)?.into_iter().map(|(b, _)| b).collect();
        for (f, b) in files.iter().zip(&cubins) {
            if !f.exists() && std::fs::create_dir_all(cache_dir()).is_ok() {
                // A cache that cannot be written only costs the next process a compile.
                let _ = crate::store::write_atomic(f, b);
            }
        }
        let mut modules = Vec::with_capacity(cubins.len());
        for cubin in &cubins {
            match unsafe { result::module::load_data(cubin.as_ptr() as *const _) }.ctx("cuModuleLoadData") {
                Ok(m) => modules.push(m),
                Err(e) => {
                    for m in modules {
                        unsafe {
                            let _ = result::module::unload(m);
                        }
                    }
                    return Err(e);
                }
            }
        }
        let info = ModuleInfo { cache_file: files[0].clone(), from_cache, seconds: t0.elapsed().as_secs_f64() };
        Ok(Kernels { modules, funcs: RefCell::new(HashMap::new()), info })
    }

    /// The name of a loaded kernel function.
    pub fn name_of(&self, f: sys::CUfunction) -> Option<String> {
        self.funcs.borrow().iter().find(|(n, g)| **g == f && !n.contains('#')).map(|(n, _)| n.clone())
    }

    /// The kernel `name`, allowed `bytes` of dynamic shared memory (set once per kernel).
    pub fn get_smem(&self, name: &str, bytes: usize) -> GpuResult<sys::CUfunction> {
        let key = format!("{name}#smem");
        let f = self.get(name)?;
        if !self.funcs.borrow().contains_key(&key) {
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .ctx(&format!("shared memory limit of `{name}`"))?;
            self.funcs.borrow_mut().insert(key, f);
        }
        Ok(f)
    }

    /// The kernel `name` (an `extern "C"` symbol of the sources).
    pub fn get(&self, name: &str) -> GpuResult<sys::CUfunction> {
        if let Some(&f) = self.funcs.borrow().get(name) {
            return Ok(f);
        }
        let cname = CString::new(name).map_err(|_| GpuError::new("kernel name holds a NUL byte"))?;
        let mut last = None;
        for &m in &self.modules {
            match unsafe { result::module::get_function(m, cname.clone()) } {
                Ok(f) => {
                    self.funcs.borrow_mut().insert(name.to_string(), f);
                    return Ok(f);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(GpuError(format!("kernel `{name}`: {}", last.map_or("no modules".to_string(), |e| format!("{e:?}")))))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for &m in &self.modules {
            unsafe {
                let _ = result::module::unload(m);
            }
        }
    }
}

/// The cache file of part `i` for `arch`: named by the hash of its source, the NVRTC version and the options.
fn part_cache_file(arch: (i32, i32), i: usize) -> PathBuf {
    let (va, vb) = nvrtc_version();
    let src = part_source(i);
    let ver = format!("nvrtc {va}.{vb} {}", options(arch, PARTS[i].1).join(" "));
    let key = fnv64(&[src.as_bytes(), ver.as_bytes()]);
    cache_dir().join(format!("kernels-{key:016x}-p{i}-sm_{}{}.cubin", arch.0, arch.1))
}

/// Every part's output with the seconds its compile took (0 for one given): those given, and the rest compiled
/// on one thread each, to a cubin or (`ptx`) to PTX text.
fn compile_parts(arch: (i32, i32), have: Vec<Option<Vec<u8>>>, ptx: bool) -> GpuResult<Vec<(Vec<u8>, f64)>> {
    std::thread::scope(|s| {
        let jobs: Vec<_> = have
            .into_iter()
            .enumerate()
            .map(|(i, b)| match b {
                Some(b) => Err(b),
                None => Ok(s.spawn(move || {
                    let t = Instant::now();
                    compile(arch, i, ptx).map(|out| (out, t.elapsed().as_secs_f64()))
                })),
            })
            .collect();
        jobs.into_iter()
            .map(|j| match j {
                Err(b) => Ok((b, 0.0)),
                Ok(h) => h.join().unwrap_or_else(|_| Err(GpuError::new("NVRTC: a compile thread panicked"))),
            })
            .collect()
    })
}

/// One part compiled to PTX: its kernel entry names and its compile seconds.
pub type PartPtx = (Vec<String>, f64);

/// Compile every part to PTX (no GPU needed, only NVRTC), each on its own thread: per part its kernel entry names
/// and its compile seconds, and the wall seconds of the whole. For checking the split on a machine without a GPU.
pub fn compile_all_ptx(arch: (i32, i32)) -> GpuResult<(Vec<PartPtx>, f64)> {
    if !unsafe { nvrtc::is_culib_present() } {
        return Err(GpuError::new("the NVRTC library (libnvrtc.so) was not found on this machine"));
    }
    let t0 = Instant::now();
    let parts = compile_parts(arch, vec![None; PARTS.len()], true)?;
    let mut out = Vec::with_capacity(parts.len());
    for (ptx, secs) in parts {
        let names = String::from_utf8_lossy(&ptx)
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(".visible .entry ").or_else(|| l.trim_start().strip_prefix(".entry ")))
            .map(|n| n.split('(').next().unwrap_or(n).trim().to_string())
            .collect();
        out.push((names, secs));
    }
    Ok((out, t0.elapsed().as_secs_f64()))
}
