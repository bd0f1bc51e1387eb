//! A thin owner of the CUDA driver objects the engine uses, over cudarc's raw driver API: the context, the engine's
//! stream and a side stream (work forked off the main chain and joined back, also inside a captured graph), device
//! buffers, events and graphs. The engine keeps raw device pointers so that a decode step can be captured
//! into a CUDA graph and replayed (cudarc's safe slices track events per buffer, which graph capture forbids).

use std::cell::{Cell, RefCell};
use std::ffi::c_void;

use cudarc::driver::{result, sys};

/// What went wrong on the GPU, as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GpuError(pub String);

pub type GpuResult<T> = std::result::Result<T, GpuError>;

impl GpuError {
    pub fn new(msg: impl Into<String>) -> Self {
        GpuError(msg.into())
    }
}

/// Attach what was being done to a driver error.
pub trait Ctx<T> {
    fn ctx(self, what: &str) -> GpuResult<T>;
}

impl<T> Ctx<T> for std::result::Result<T, result::DriverError> {
    fn ctx(self, what: &str) -> GpuResult<T> {
        self.map_err(|e| {
            let name = e.error_name().map(|c| c.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
            GpuError(format!("CUDA driver: {what}: {name}"))
        })
    }
}

/// The libraries the engine loads at run time, checked without touching the GPU: one line naming what is missing.
pub fn probe() -> GpuResult<()> {
    // SAFETY: these only try to dlopen the libraries and report whether that worked.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::new("the CUDA driver library (libcuda.so) was not found on this machine"));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::new("the NVRTC library (libnvrtc.so) was not found on this machine"));
    }
    Ok(())
}

/// The device, its primary context made current on this thread, and the engine's stream.
pub struct Gpu {
    pub device: sys::CUdevice,
    ctx: sys::CUcontext,
    pub stream: sys::CUstream,
    /// The side stream: launches go there while [`Gpu::on_side`] runs (plain launches, no PDL), ordered against the
    /// main stream only by [`Gpu::fork`] and [`Gpu::join`].
    side: sys::CUstream,
    side_now: Cell<bool>,
    /// The next main-stream launch follows a [`Gpu::join`]: launched plainly (its dependency on the side stream's
    /// kernel is a full one, not a programmatic edge).
    joined: Cell<bool>,
    pub name: String,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    pub sms: i32,
    /// Launch kernels with programmatic dependent launch (sm_90+; default on, `DEJAVU_PDL=0` turns it off): a
    /// kernel may start while the previous one finishes; each waits (`pdl_wait` in kernels/common.cuh) before
    /// reading its inputs, so only the launch latency and the previous kernel's tail are overlapped. Measured on
    /// the H200 (2026-12-05, side by side): SmolLM2 0.715 -> 0.651 ms a token, Llama-2-7B unchanged (4.88 ms).
    pub pdl: bool,
    /// Launches issued since [`Gpu::trace`] started (counted while tracing) and, when set, how many of them run:
    /// later ones are skipped (`bench --kernels` times the graphs of a step's first n kernels).
    launched: Cell<usize>,
    limit: Cell<Option<usize>>,
    trace: RefCell<Option<Vec<(sys::CUfunction, bool)>>>,
}

impl Gpu {
    pub fn new(ordinal: usize) -> GpuResult<Self> {
        probe()?;
        result::init().ctx("cuInit")?;
        let count = result::device::get_count().ctx("cuDeviceGetCount")?;
        if ordinal as i32 >= count {
            return Err(GpuError(format!("GPU {ordinal} requested but {count} CUDA device(s) are visible")));
        }
        let device = result::device::get(ordinal as i32).ctx("cuDeviceGet")?;
        // SAFETY: `device` is valid; the primary context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(device) }.ctx("cuDevicePrimaryCtxRetain")?;
        unsafe { result::ctx::set_current(ctx) }.ctx("cuCtxSetCurrent")?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).ctx("cuStreamCreate")?;
        let side = result::stream::create(result::stream::StreamKind::NonBlocking).ctx("cuStreamCreate")?;
        let attr = |a| unsafe { result::device::get_attribute(device, a) }.ctx("cuDeviceGetAttribute");
        let arch = (
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let name = result::device::get_name(device).ctx("cuDeviceGetName")?;
        let pdl = arch.0 >= 9 && std::env::var("DEJAVU_PDL").map_or(true, |v| v != "0");
        Ok(Gpu { device, ctx, stream, side, side_now: Cell::new(false), joined: Cell::new(false), name, arch, sms, pdl, launched: Cell::new(0), limit: Cell::new(None), trace: RefCell::new(None) })
    }

    /// Make this context current on the calling thread (every entry point of the engine does).
    pub fn bind(&self) -> GpuResult<()> {
        unsafe { result::ctx::set_current(self.ctx) }.ctx("cuCtxSetCurrent")
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> GpuResult<(usize, usize)> {
        result::mem_get_info().ctx("cuMemGetInfo")
    }

    pub fn sync(&self) -> GpuResult<()> {
        unsafe { result::stream::synchronize(self.stream) }.ctx("cuStreamSynchronize")
    }

    pub fn alloc(&self, bytes: usize) -> GpuResult<DBuf> {
        DBuf::new(bytes)
    }

    /// Copy host values into `dst` at byte offset `off` (stream-ordered; the host slice is staged before return).
    pub fn upload<T: Copy>(&self, dst: &DBuf, off: usize, src: &[T]) -> GpuResult<()> {
        let bytes = std::mem::size_of_val(src);
        if off + bytes > dst.bytes {
            return Err(GpuError(format!("upload of {bytes} bytes at {off} overruns a buffer of {}", dst.bytes)));
        }
        if bytes == 0 {
            return Ok(());
        }
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst.ptr + off as u64, src.as_ptr() as *const c_void, bytes, self.stream) }
            .result()
            .ctx("cuMemcpyHtoDAsync")
    }

    /// Copy `dst.len()` values from device address `src` to the host (synchronises the stream).
    pub fn download<T: Copy>(&self, src: sys::CUdeviceptr, dst: &mut [T]) -> GpuResult<()> {
        let bytes = std::mem::size_of_val(dst);
        if bytes == 0 {
            return Ok(());
        }
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, bytes, self.stream) }
            .result()
            .ctx("cuMemcpyDtoHAsync")?;
        self.sync()
    }

    pub fn copy(&self, dst: sys::CUdeviceptr, src: sys::CUdeviceptr, bytes: usize) -> GpuResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.cur()) }.ctx("cuMemcpyDtoDAsync")
    }

    /// Set the first `bytes` bytes at `dst` to `byte`.
    pub fn memset_bytes(&self, dst: sys::CUdeviceptr, byte: u8, bytes: usize) -> GpuResult<()> {
        unsafe { result::memset_d8_async(dst, byte, bytes, self.cur()) }.ctx("cuMemsetD8Async")
    }

    pub fn memset(&self, dst: &DBuf, byte: u8) -> GpuResult<()> {
        unsafe { result::memset_d8_async(dst.ptr, byte, dst.bytes, self.cur()) }.ctx("cuMemsetD8Async")
    }

    /// The stream launches, copies and memsets go to now: the side stream inside [`Gpu::on_side`], else the main.
    fn cur(&self) -> sys::CUstream {
        if self.side_now.get() {
            self.side
        } else {
            self.stream
        }
    }

    /// Run `f` with every launch, copy and memset going to the side stream. The side stream's work must have been
    /// ordered after what it reads by [`Gpu::fork`] and before what depends on it by [`Gpu::join`].
    pub fn on_side<R>(&self, f: impl FnOnce() -> R) -> R {
        self.side_now.set(true);
        let r = f();
        self.side_now.set(false);
        r
    }

    /// The side stream's next work waits for everything the main stream has been given so far (`ev` is recorded on
    /// the main stream).
    pub fn fork(&self, ev: &Event) -> GpuResult<()> {
        unsafe { result::event::record(ev.0, self.stream) }.ctx("cuEventRecord")?;
        unsafe { result::stream::wait_event(self.side, ev.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.ctx("cuStreamWaitEvent")
    }

    /// The main stream's next work waits for everything the side stream has been given so far.
    pub fn join(&self, ev: &Event) -> GpuResult<()> {
        self.mark_side(ev)?;
        self.wait_mark(ev)
    }

    /// Record `ev` on the side stream: it completes once what the side stream has been given so far has run (for
    /// [`Gpu::wait_mark`] later, while the side stream goes on with other work).
    pub fn mark_side(&self, ev: &Event) -> GpuResult<()> {
        unsafe { result::event::record(ev.0, self.side) }.ctx("cuEventRecord")
    }

    /// The main stream's next work waits for `ev` (recorded by [`Gpu::mark_side`]).
    pub fn wait_mark(&self, ev: &Event) -> GpuResult<()> {
        unsafe { result::stream::wait_event(self.stream, ev.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.ctx("cuStreamWaitEvent")?;
        self.joined.set(true);
        Ok(())
    }

    /// An event for [`Gpu::fork`] / [`Gpu::join`] (no timing).
    pub fn sync_event(&self) -> GpuResult<Event> {
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).ctx("cuEventCreate")?;
        Ok(Event(e))
    }

    /// Launch `f` with `args` on the current stream (see [`Gpu::on_side`]); on the main stream with programmatic
    /// dependent launch where enabled, except right after a [`Gpu::join`].
    pub(crate) fn launch(&self, f: sys::CUfunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &mut Args) -> GpuResult<()> {
        let side = self.side_now.get();
        if let Some(t) = self.trace.borrow_mut().as_mut() {
            let n = self.launched.get();
            self.launched.set(n + 1);
            t.push((f, side));
            if self.limit.get().is_some_and(|l| n >= l) {
                return Ok(());
            }
        }
        let mut ptrs = args.ptrs();
        let after_join = !side && self.joined.replace(false);
        if !self.pdl || side || after_join {
            return unsafe { result::launch_kernel(f, grid, (block, 1, 1), smem, self.cur(), &mut ptrs) }
                .ctx("cuLaunchKernel");
        }
        // SAFETY: a zeroed attribute value is valid; only the programmatic-serialization member is set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        unsafe { sys::cuLaunchKernelEx(&config, f, ptrs.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .ctx("cuLaunchKernelEx")
    }

    /// Start recording launches (function and stream, in issue order); with `limit`, only the first `limit`
    /// launches from now on run, the rest are skipped.
    pub fn trace(&self, limit: Option<usize>) {
        self.launched.set(0);
        self.limit.set(limit);
        *self.trace.borrow_mut() = Some(Vec::new());
    }

    /// Stop recording: the launches since [`Gpu::trace`] as (function, on the side stream), skipped ones included.
    pub fn trace_take(&self) -> Vec<(sys::CUfunction, bool)> {
        self.limit.set(None);
        self.trace.borrow_mut().take().unwrap_or_default()
    }

    /// Blocks of `f` with `threads` threads and `smem` bytes of dynamic shared memory one multiprocessor holds.
    pub(crate) fn occupancy(&self, f: sys::CUfunction, threads: u32, smem: usize) -> GpuResult<u32> {
        let mut n: std::ffi::c_int = 0;
        // SAFETY: `f` is a loaded function of the current context; `n` outlives the call.
        unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, threads as std::ffi::c_int, smem) }
            .result()
            .ctx("cuOccupancyMaxActiveBlocksPerMultiprocessor")?;
        Ok(n.max(0) as u32)
    }

    pub fn event(&self) -> GpuResult<Event> {
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).ctx("cuEventCreate")?;
        Ok(Event(e))
    }

    pub fn record(&self, e: &Event) -> GpuResult<()> {
        unsafe { result::event::record(e.0, self.stream) }.ctx("cuEventRecord")
    }

    /// Start capturing this stream's work into a graph.
    pub fn begin_capture(&self) -> GpuResult<()> {
        unsafe { result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) }
            .ctx("cuStreamBeginCapture")
    }

    /// Finish a capture and instantiate it.
    pub fn end_capture(&self) -> GpuResult<Graph> {
        let g = unsafe { result::stream::end_capture(self.stream) }.ctx("cuStreamEndCapture")?;
        let exec = unsafe { result::graph::instantiate(g, sys::CUgraphInstantiate_flags(0)) };
        unsafe { result::graph::destroy(g) }.ctx("cuGraphDestroy")?;
        Ok(Graph(exec.ctx("cuGraphInstantiate")?))
    }

    pub fn replay(&self, g: &Graph) -> GpuResult<()> {
        unsafe { result::graph::launch(g.0, self.stream) }.ctx("cuGraphLaunch")
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = result::stream::synchronize(self.side);
            let _ = result::stream::synchronize(self.stream);
            let _ = result::stream::destroy(self.side);
            let _ = result::stream::destroy(self.stream);
            let _ = result::primary_ctx::release(self.device);
        }
        let _ = self.ctx;
    }
}

/// A device allocation, freed on drop.
pub struct DBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DBuf {
    pub fn new(bytes: usize) -> GpuResult<Self> {
        let ptr = unsafe { result::malloc_sync(bytes.max(256)) }.ctx(&format!("cuMemAlloc of {bytes} bytes"))?;
        Ok(DBuf { ptr, bytes })
    }

    /// Address of element `i` of a buffer of `elem`-byte values.
    pub fn at(&self, i: usize, elem: usize) -> sys::CUdeviceptr {
        self.ptr + (i * elem) as u64
    }
}

impl Drop for DBuf {
    fn drop(&mut self) {
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// A CUDA event (timing), destroyed on drop.
pub struct Event(pub sys::CUevent);

impl Event {
    /// Milliseconds from `self` to `end` (both recorded and complete).
    pub fn elapsed_ms(&self, end: &Event) -> GpuResult<f32> {
        unsafe { result::event::synchronize(end.0) }.ctx("cuEventSynchronize")?;
        unsafe { result::event::elapsed(self.0, end.0) }.ctx("cuEventElapsedTime")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        unsafe {
            let _ = result::event::destroy(self.0);
        }
    }
}

/// An instantiated graph, destroyed on drop.
pub struct Graph(sys::CUgraphExec);

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = result::graph::exec_destroy(self.0);
        }
    }
}

/// Kernel arguments: every parameter of our kernels is a pointer, an int, a float or a 64-bit integer, each kept
/// in its own 8-byte slot (the driver reads the parameter's size from the slot's address, little-endian).
#[derive(Default)]
pub struct Args(Vec<u64>);

impl Args {
    pub fn new() -> Self {
        Args(Vec::with_capacity(16))
    }
    pub fn ptr(mut self, p: sys::CUdeviceptr) -> Self {
        self.0.push(p);
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.0.push(v as u32 as u64);
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.0.push(v.to_bits() as u64);
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.0.push(v as u64);
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.push(v);
        self
    }
    fn ptrs(&mut self) -> Vec<*mut c_void> {
        self.0.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect()
    }
}
