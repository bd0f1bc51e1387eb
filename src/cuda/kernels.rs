//! Our kernels (`kernels/*.cu`, embedded in the binary) compiled by NVRTC into one module for the GPU's
//! architecture, once: the cubin is cached on disk under the source's hash, so a later process loads it in
//! milliseconds. Nothing compiled is committed.

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
];

/// How the module was obtained, for start-up reports.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    pub cache_file: PathBuf,
    pub from_cache: bool,
    pub seconds: f64,
}

/// The loaded module and a name -> function table.
pub struct Kernels {
    module: sys::CUmodule,
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

fn options(arch: (i32, i32)) -> Vec<String> {
    vec![format!("--gpu-architecture=sm_{}{}", arch.0, arch.1), "-default-device".into(), "--std=c++17".into()]
}

fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    unsafe {
        let _ = nvrtc::nvrtcVersion(&mut a, &mut b);
    }
    (a, b)
}

/// Compile the sources to a cubin for `arch`.
pub fn compile(arch: (i32, i32)) -> GpuResult<Vec<u8>> {
    let src: String = SOURCES.iter().map(|(name, s)| format!("// ---- {name}\n{s}\n")).collect();
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
    let opts = options(arch);
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    let out = (|| {
        if let Err(e) = compiled {
            let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }.unwrap_or_default();
            let log: String = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
            return Err(GpuError(format!("NVRTC could not compile the kernels for sm_{}{} ({e:?}):\n{log}", arch.0, arch.1)));
        }
        let mut size = 0usize;
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
    /// Load the module for `arch` from the disk cache, compiling (and caching) it first when absent.
    pub fn load(arch: (i32, i32)) -> GpuResult<Self> {
        let t0 = Instant::now();
        let (va, vb) = nvrtc_version();
        let opts = options(arch).join(" ");
        let mut parts: Vec<&[u8]> = SOURCES.iter().map(|(_, s)| s.as_bytes()).collect();
        let ver = format!("nvrtc {va}.{vb} {opts}");
        parts.push(ver.as_bytes());
        let key = fnv64(&parts);
        let file = cache_dir().join(format!("kernels-{key:016x}-sm_{}{}.cubin", arch.0, arch.1));
        let (cubin, from_cache) = match std::fs::read(&file) {
            Ok(b) if !b.is_empty() => (b, true),
            _ => {
                let b = compile(arch)?;
                // A cache that cannot be written only costs the next process a compile.
                if std::fs::create_dir_all(cache_dir()).is_ok() {
                    let _ = crate::store::write_atomic(&file, &b);
                }
                (b, false)
            }
        };
        let module = unsafe { result::module::load_data(cubin.as_ptr() as *const _) }.ctx("cuModuleLoadData")?;
        let info = ModuleInfo { cache_file: file, from_cache, seconds: t0.elapsed().as_secs_f64() };
        Ok(Kernels { module, funcs: RefCell::new(HashMap::new()), info })
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
        let f = unsafe { result::module::get_function(self.module, cname) }.ctx(&format!("kernel `{name}`"))?;
        self.funcs.borrow_mut().insert(name.to_string(), f);
        Ok(f)
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}
