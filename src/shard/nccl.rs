//! NCCL's collectives for the ranks of a sharded step on one box: one process driving every
//! GPU with one thread per rank, as NCCL's own tests do (nccl-tests `-t`), one communicator
//! per rank made for all of them at once with `ncclCommInitAll`.
//!
//! libnccl.so.2 is loaded at run time (it comes with PyTorch's `nvidia-nccl` wheel and with
//! the distributions' `libnccl2`), so the binary starts where it is absent and the cases that
//! need it are skipped with the reason. cudarc's own loader is not used: it looks for
//! `libnccl.so` and `libnccl.so.<CUDA major>`, never `libnccl.so.2`, and panics when a call
//! reaches a library it could not load; only its bindings' types are.
//!
//! Every collective is enqueued on the rank's own stream, the one its [`CudaBackend`]
//! launches its kernels and allocates on, so it is ordered with the compute around it without
//! events (PyTorch uses a separate NCCL stream that waits on the compute stream; the order
//! of the work on each GPU is the same).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::result as drv;
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t};

use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shard::comm::{check_pair, owned, shard_len, Comm, Traffic};

/// The names tried, in order: the soname every NCCL 2 ships, then the development link.
const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// NCCL 2.10 added `ncclBfloat16`; older libraries number their types differently past it.
const OLDEST_VERSION: (u32, u32) = (2, 10);

/// An `ncclResult_t`, read as the int it is: a newer library may return codes that cudarc's
/// enum lacks, and an enum holding such a value would be undefined behaviour.
type NcclStatus = c_int;
const NCCL_SUCCESS: NcclStatus = 0;

type ReduceLike = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> NcclStatus;

/// The entry points this module calls (NCCL's `nccl.h`, stable since 2.0 unless noted).
struct Api {
    /// (major, minor, patch) from `ncclGetVersion`.
    version: (u32, u32, u32),
    get_error_string: unsafe extern "C" fn(NcclStatus) -> *const c_char,
    /// `ncclGetLastError` (2.13 and later): the detail behind the last failure.
    get_last_error: Option<unsafe extern "C" fn(ncclComm_t) -> *const c_char>,
    comm_init_all: unsafe extern "C" fn(*mut ncclComm_t, c_int, *const c_int) -> NcclStatus,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> NcclStatus,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> NcclStatus,
    all_reduce: ReduceLike,
    reduce_scatter: ReduceLike,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclComm_t,
        cudaStream_t,
    ) -> NcclStatus,
    reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> NcclStatus,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> NcclStatus,
    group_start: unsafe extern "C" fn() -> NcclStatus,
    group_end: unsafe extern "C" fn() -> NcclStatus,
}

/// NCCL, loaded once per process, or why it could not be.
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|why| {
        Error::Unsupported(format!(
            "NCCL could not be loaded (libnccl.so.2 comes with PyTorch's nvidia-nccl wheel or \
             the libnccl2 package; put its folder on LD_LIBRARY_PATH): {why}"
        ))
    })
}

/// The last `dlerror` of this thread, as text.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by libc, valid until the
    // next dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "no reason given".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// `name` from the library `handle`, as the function pointer type `F`.
///
/// # Safety
/// `F` must be an `unsafe extern "C" fn` type matching the symbol's C prototype.
unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &str) -> Option<F> {
    assert_eq!(
        std::mem::size_of::<F>(),
        std::mem::size_of::<*mut c_void>(),
        "bug: {name} is not bound to a function pointer"
    );
    let cname = CString::new(name).ok()?;
    // SAFETY (caller's and ours): handle is a live dlopen handle; a non-null result is the
    // address of the function, which the caller's F describes.
    let p = libc::dlsym(handle, cname.as_ptr());
    (!p.is_null()).then(|| std::mem::transmute_copy::<*mut c_void, F>(&p))
}

fn load() -> std::result::Result<Api, String> {
    let mut reasons = Vec::new();
    let mut handle: *mut c_void = std::ptr::null_mut();
    for name in LIBRARY_NAMES {
        let cname = CString::new(name).expect("library names hold no NUL");
        // SAFETY: dlopen of a library by name; its initializers are NCCL's own. The handle
        // is never closed, so every symbol taken from it stays valid for the process.
        handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
        reasons.push(dl_error());
    }
    if handle.is_null() {
        return Err(reasons.join("; "));
    }
    macro_rules! need {
        ($name:literal) => {
            // SAFETY: the field this initializes has the prototype nccl.h gives $name.
            unsafe { symbol(handle, $name) }
                .ok_or_else(|| format!("the library has no {} ({})", $name, dl_error()))?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> NcclStatus = need!("ncclGetVersion");
    let mut code: c_int = 0;
    // SAFETY: writes one int.
    let status = unsafe { get_version(&mut code) };
    if status != NCCL_SUCCESS {
        return Err(format!("ncclGetVersion returned {status}"));
    }
    let version = decode_version(code);
    if (version.0, version.1) < OLDEST_VERSION {
        return Err(format!(
            "it is NCCL {}.{}.{}, older than {}.{} (the first with bfloat16)",
            version.0, version.1, version.2, OLDEST_VERSION.0, OLDEST_VERSION.1
        ));
    }
    Ok(Api {
        version,
        get_error_string: need!("ncclGetErrorString"),
        // SAFETY: `const char* ncclGetLastError(ncclComm_t)`; absent before 2.13.
        get_last_error: unsafe { symbol(handle, "ncclGetLastError") },
        comm_init_all: need!("ncclCommInitAll"),
        comm_destroy: need!("ncclCommDestroy"),
        comm_abort: need!("ncclCommAbort"),
        all_reduce: need!("ncclAllReduce"),
        reduce_scatter: need!("ncclReduceScatter"),
        all_gather: need!("ncclAllGather"),
        reduce: need!("ncclReduce"),
        broadcast: need!("ncclBroadcast"),
        group_start: need!("ncclGroupStart"),
        group_end: need!("ncclGroupEnd"),
    })
}

/// `NCCL_VERSION_CODE`: major·10000 + minor·100 + patch from 2.9 on, major·1000 +
/// minor·100 + patch before (nccl.h's `NCCL_VERSION` macro).
fn decode_version(code: c_int) -> (u32, u32, u32) {
    let c = code.max(0) as u32;
    if c >= 10000 {
        (c / 10000, (c % 10000) / 100, c % 100)
    } else {
        (c / 1000, (c % 1000) / 100, c % 100)
    }
}

impl Api {
    /// `Err(Error::Cuda("<what> failed: <NCCL's reason>"))` unless `status` is success.
    fn check(&self, what: &str, status: NcclStatus, comm: ncclComm_t) -> Result<()> {
        if status == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { c_text((self.get_error_string)(status)) };
        let mut msg = format!("{what} failed: {text} (ncclResult_t {status})");
        if let Some(last) = self.get_last_error {
            // SAFETY: returns a NUL-terminated string owned by NCCL (or null); the comm
            // argument is only a hint and may be null.
            let detail = unsafe { c_text(last(comm)) };
            if !detail.is_empty() {
                msg.push_str(&format!(": {detail}"));
            }
        }
        Err(Error::Cuda(msg))
    }
}

/// A C string, copied; empty for null.
///
/// # Safety
/// `p` is null or points at a NUL-terminated string.
unsafe fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().trim().to_string()
    }
}

fn nccl_dtype(d: DType) -> ncclDataType_t {
    match d {
        DType::F32 => ncclDataType_t::ncclFloat32,
        DType::Bf16 => ncclDataType_t::ncclBfloat16,
        DType::I32 => ncclDataType_t::ncclInt32,
    }
}

/// How a reduce-scatter or an all-gather of a full tensor of `len` elements over `world`
/// ranks is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// Nothing to move (an empty tensor).
    Nothing,
    /// `len` divides evenly: NCCL's own ncclReduceScatter / ncclAllGather, `count` elements
    /// per rank (NCCL lays rank r's block at `r·count`, as [`owned`] does).
    Even { count: usize },
    /// Ragged last shards, which NCCL's collectives cannot express: one ncclReduce /
    /// ncclBroadcast per rank that owns anything, rooted at it, inside one group, as
    /// (root, offset, count) in rank order.
    PerRoot(Vec<(usize, usize, usize)>),
}

fn plan(len: usize, world: usize) -> Plan {
    if len == 0 {
        Plan::Nothing
    } else if len % world == 0 {
        Plan::Even {
            count: shard_len(len, world),
        }
    } else {
        Plan::PerRoot(
            (0..world)
                .map(|r| {
                    let (offset, count) = owned(len, world, r);
                    (r, offset, count)
                })
                .filter(|&(_, _, count)| count > 0)
                .collect(),
        )
    }
}

/// Where a rank's communicator stands; changed only under [`Group::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Made and not in use.
    Idle,
    /// Its rank's thread is inside an NCCL call on it.
    InCall,
    /// Aborted (or never to be used again): nothing may touch it.
    Gone,
}

struct State {
    abandoned: Option<String>,
    slots: Vec<Slot>,
}

/// Every rank's communicator, shared by the ranks' handles; the last handle dropped destroys
/// the ones not aborted.
struct Group {
    api: &'static Api,
    comms: Vec<ncclComm_t>,
    ordinals: Vec<usize>,
    /// Free device memory before minus after the communicators were made, per rank.
    buffers: Vec<Option<u64>>,
    state: Mutex<State>,
}

// SAFETY: an NCCL communicator may be used from any thread, by one thread at a time (nccl
// "Thread Safety": primitives are re-entrant, threads use separate communicators). Rank r's
// communicator is entered only by the thread holding rank r's handle (`&mut self` methods),
// under the InCall slot; ncclCommAbort from another thread is taken only on Idle
// communicators, which no one can enter afterwards.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks rank `rank`'s communicator busy and returns it, or says why it may not be used.
    fn enter(&self, rank: usize) -> Result<ncclComm_t> {
        let mut st = self.lock();
        if let Some(why) = &st.abandoned {
            return Err(abandoned(why));
        }
        match st.slots[rank] {
            Slot::Idle => {
                st.slots[rank] = Slot::InCall;
                Ok(self.comms[rank])
            }
            Slot::InCall => Err(Error::Invalid(format!(
                "bug: rank {rank}'s NCCL communicator entered twice"
            ))),
            Slot::Gone => Err(Error::Invalid(format!(
                "rank {rank}'s NCCL communicator was aborted"
            ))),
        }
    }

    /// Ends rank `rank`'s call. When another rank abandoned the group meanwhile, this rank
    /// aborts its own communicator now (the abandoning rank left it alone because it was
    /// busy) and returns the abandonment.
    fn leave(&self, rank: usize) -> Result<()> {
        let mut st = self.lock();
        if st.slots[rank] != Slot::InCall {
            return Ok(());
        }
        match st.abandoned.clone() {
            None => {
                st.slots[rank] = Slot::Idle;
                Ok(())
            }
            Some(why) => {
                st.slots[rank] = Slot::Gone;
                drop(st);
                self.abort(rank);
                Err(abandoned(&why))
            }
        }
    }

    /// ncclCommAbort on rank `rank`'s communicator, whose slot the caller has set to Gone.
    fn abort(&self, rank: usize) {
        // SAFETY: the communicator is live (its slot was Idle or InCall, now Gone, so no one
        // enters it again) and no thread is inside a call on it, unless it is the caller.
        let status = unsafe { (self.api.comm_abort)(self.comms[rank]) };
        if let Err(e) = self
            .api
            .check("ncclCommAbort", status, std::ptr::null_mut())
        {
            eprintln!(
                "warning: rank {rank}'s NCCL communicator (GPU {}) did not abort cleanly: {e}",
                self.ordinals[rank]
            );
        }
    }
}

fn abandoned(why: &str) -> Error {
    Error::Invalid(format!("a collective was abandoned: {why}"))
}

impl Drop for Group {
    fn drop(&mut self) {
        let slots = self.lock().slots.clone();
        // Destroyed one after the other from one thread, as NCCL's single-process example
        // does: every operation on them has been enqueued by now, so none waits for a rank.
        for (r, slot) in slots.into_iter().enumerate() {
            if slot == Slot::Gone {
                continue;
            }
            // SAFETY: a live communicator (never aborted), used by no one: the last handle
            // on the group is gone.
            let status = unsafe { (self.api.comm_destroy)(self.comms[r]) };
            if let Err(e) = self
                .api
                .check("ncclCommDestroy", status, std::ptr::null_mut())
            {
                eprintln!(
                    "warning: rank {r}'s NCCL communicator (GPU {}) was not destroyed: {e}; \
                     its memory is released when the process ends",
                    self.ordinals[r]
                );
            }
        }
    }
}

/// Rank `rank`'s handle on an NCCL group.
pub struct Nccl {
    rank: usize,
    group: Arc<Group>,
    traffic: Traffic,
}

/// A communicator per rank over NCCL, one GPU per rank (rank r on `backends[r]`'s GPU).
/// `Error::Unsupported` when NCCL cannot be loaded, so such cases are skipped with the reason.
pub fn group(backends: &[&dyn Backend]) -> Result<Vec<Box<dyn Comm>>> {
    if backends.is_empty() {
        return Err(Error::Invalid(
            "a world of 0 ranks has no one to train".into(),
        ));
    }
    let cudas = backends
        .iter()
        .enumerate()
        .map(|(r, b)| {
            b.as_cuda().ok_or_else(|| {
                Error::Invalid(format!(
                    "rank {r} is on the {} backend; NCCL moves GPU memory only",
                    b.kind().name()
                ))
            })
        })
        .collect::<Result<Vec<&CudaBackend>>>()?;
    let ordinals: Vec<usize> = cudas.iter().map(|c| c.ordinal()).collect();
    for (r, o) in ordinals.iter().enumerate() {
        if let Some(first) = ordinals[..r].iter().position(|x| x == o) {
            return Err(Error::Invalid(format!(
                "ranks {first} and {r} are both on GPU {o}; NCCL needs a GPU per rank"
            )));
        }
    }
    let world = c_int::try_from(backends.len()).map_err(|_| {
        Error::Invalid(format!(
            "a world of {} ranks is beyond what NCCL takes",
            backends.len()
        ))
    })?;
    let devlist = ordinals
        .iter()
        .map(|&o| {
            c_int::try_from(o).map_err(|_| Error::Invalid(format!("GPU {o} is out of range")))
        })
        .collect::<Result<Vec<c_int>>>()?;
    let api = api()?;

    // NCCL's own device memory: every device's free memory before and after. Device-wide,
    // so whatever else runs on the GPU meanwhile counts too: a cross-check, not a figure.
    // NCCL 2.22 and later connect some algorithms at their first use (NCCL_RUNTIME_CONNECT),
    // whose buffers come after this and are not counted.
    let free = |c: &CudaBackend| c.device_free_total().ok().map(|(f, _)| f);
    let before: Vec<Option<u64>> = cudas.iter().map(|c| free(c)).collect();

    let mut comms: Vec<ncclComm_t> = vec![std::ptr::null_mut(); backends.len()];
    // SAFETY: comms has room for `world` handles and devlist holds `world` distinct
    // ordinals of GPUs the driver has opened.
    let status = unsafe { (api.comm_init_all)(comms.as_mut_ptr(), world, devlist.as_ptr()) };
    api.check("ncclCommInitAll", status, std::ptr::null_mut())?;
    let mut group = Group {
        api,
        comms,
        ordinals,
        buffers: Vec::new(),
        state: Mutex::new(State {
            abandoned: None,
            slots: vec![Slot::Idle; backends.len()],
        }),
    };
    group.buffers = cudas
        .iter()
        .zip(&before)
        .map(|(c, b)| Some(b.as_ref()?.saturating_sub(free(c)?)))
        .collect();
    if let Some(c) = cudas.first() {
        // The measurement bound each GPU in turn; leave the caller on rank 0's.
        c.bind_context()?;
    }
    let group = Arc::new(group);
    Ok((0..backends.len())
        .map(|rank| {
            Box::new(Nccl {
                rank,
                group: group.clone(),
                traffic: Traffic::default(),
            }) as Box<dyn Comm>
        })
        .collect())
}

/// A device pointer `elements` elements of `dtype` into `t`.
fn at(t: &Tensor, elements: usize) -> u64 {
    t.device_ptr() + (elements * t.dtype().size()) as u64
}

impl Nccl {
    /// The rank's backend, checked to be on this rank's GPU, its context made current.
    fn backend<'a>(&self, be: &'a dyn Backend) -> Result<&'a CudaBackend> {
        let cuda = be.as_cuda().ok_or_else(|| {
            Error::Invalid(format!(
                "NCCL's rank {} was handed the {} backend; it moves GPU memory only",
                self.rank,
                be.kind().name()
            ))
        })?;
        let mine = self.group.ordinals[self.rank];
        if cuda.ordinal() != mine {
            return Err(Error::Invalid(format!(
                "rank {}'s NCCL communicator is on GPU {mine}, but it was handed GPU {}'s backend",
                self.rank,
                cuda.ordinal()
            )));
        }
        cuda.bind_context()?;
        Ok(cuda)
    }

    /// `f(communicator)` with the communicator marked busy for its duration.
    fn call(&self, f: impl FnOnce(ncclComm_t) -> Result<()>) -> Result<()> {
        let comm = self.group.enter(self.rank)?;
        let done = f(comm);
        let left = self.group.leave(self.rank);
        done.and(left)
    }

    /// `ops` inside ncclGroupStart/End, so the per-root operations are one collective; the
    /// group is closed even when an operation in it failed, and the first failure returned.
    fn grouped(&self, comm: ncclComm_t, ops: impl FnOnce() -> Result<()>) -> Result<()> {
        let api = self.group.api;
        // SAFETY: opens a group on this thread; closed below on every path.
        api.check("ncclGroupStart", unsafe { (api.group_start)() }, comm)?;
        let done = ops();
        // SAFETY: closes the group opened above.
        let end = api.check("ncclGroupEnd", unsafe { (api.group_end)() }, comm);
        done.and(end)
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.comms.len()
    }
    fn name(&self) -> String {
        let (major, minor, patch) = self.group.api.version;
        format!("nccl {major}.{minor}.{patch}")
    }

    fn all_reduce(&mut self, be: &dyn Backend, t: &mut Tensor) -> Result<()> {
        self.traffic.all_reduce += t.bytes();
        self.traffic.calls += 1;
        let cuda = self.backend(be)?;
        if t.is_empty() {
            return Ok(());
        }
        let api = self.group.api;
        let stream = cuda.cu_stream() as cudaStream_t;
        let (dtype, len, buf) = (nccl_dtype(t.dtype()), t.len(), t.device_ptr());
        self.call(|comm| {
            // SAFETY: in place on `t`'s `len` elements of `dtype`, on the rank's stream, which
            // orders it after the kernels that wrote `t` and before those that read it.
            let status = unsafe {
                (api.all_reduce)(
                    buf as *const c_void,
                    buf as *mut c_void,
                    len,
                    dtype,
                    ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            };
            api.check("ncclAllReduce", status, comm)
        })
    }

    fn reduce_scatter(
        &mut self,
        be: &dyn Backend,
        full: &Tensor,
        shard: &mut Tensor,
    ) -> Result<()> {
        let (world, rank) = (self.world(), self.rank);
        let (_, mine) = check_pair("reduce-scatter", full, shard, world, rank)?;
        self.traffic.reduce_scatter += full.bytes();
        self.traffic.calls += 1;
        let cuda = self.backend(be)?;
        let api = self.group.api;
        let stream = cuda.cu_stream() as cudaStream_t;
        let dtype = nccl_dtype(full.dtype());
        let s = shard.len();
        match plan(full.len(), world) {
            Plan::Nothing => Ok(()),
            Plan::Even { count } => self.call(|comm| {
                // SAFETY: `full` holds world·count elements and `shard` count, both of
                // `dtype`, on the rank's GPU; enqueued on the rank's stream.
                let status = unsafe {
                    (api.reduce_scatter)(
                        full.device_ptr() as *const c_void,
                        shard.device_ptr() as *mut c_void,
                        count,
                        dtype,
                        ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    )
                };
                api.check("ncclReduceScatter", status, comm)
            }),
            Plan::PerRoot(roots) => {
                if mine < s {
                    // SAFETY: the padding is shard[mine..s], inside the shard's s elements;
                    // ordered on the rank's stream like the reductions below.
                    unsafe {
                        drv::memset_d8_async(
                            at(shard, mine),
                            0,
                            (s - mine) * shard.dtype().size(),
                            cuda.cu_stream(),
                        )?
                    };
                }
                let recv = shard.device_ptr();
                self.call(|comm| {
                    self.grouped(comm, || {
                        for &(root, offset, count) in &roots {
                            // SAFETY: full[offset..offset+count] lies inside `full`; the
                            // result lands in shard[..count] on the root only (count is the
                            // root's owned count, at most s), NCCL ignoring recvbuff elsewhere.
                            let status = unsafe {
                                (api.reduce)(
                                    at(full, offset) as *const c_void,
                                    recv as *mut c_void,
                                    count,
                                    dtype,
                                    ncclRedOp_t::ncclSum,
                                    root as c_int,
                                    comm,
                                    stream,
                                )
                            };
                            api.check(&format!("ncclReduce (root {root})"), status, comm)?;
                        }
                        Ok(())
                    })
                })
            }
        }
    }

    fn all_gather(&mut self, be: &dyn Backend, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        let world = self.world();
        check_pair("all-gather", full, shard, world, self.rank)?;
        self.traffic.all_gather += full.bytes();
        self.traffic.calls += 1;
        let cuda = self.backend(be)?;
        let api = self.group.api;
        let stream = cuda.cu_stream() as cudaStream_t;
        let dtype = nccl_dtype(full.dtype());
        match plan(full.len(), world) {
            Plan::Nothing => Ok(()),
            Plan::Even { count } => self.call(|comm| {
                // SAFETY: `shard` holds count elements and `full` world·count, both of
                // `dtype`, on the rank's GPU; enqueued on the rank's stream.
                let status = unsafe {
                    (api.all_gather)(
                        shard.device_ptr() as *const c_void,
                        full.device_ptr() as *mut c_void,
                        count,
                        dtype,
                        comm,
                        stream,
                    )
                };
                api.check("ncclAllGather", status, comm)
            }),
            Plan::PerRoot(roots) => {
                let send = shard.device_ptr();
                self.call(|comm| {
                    self.grouped(comm, || {
                        for &(root, offset, count) in &roots {
                            // SAFETY: the root sends shard[..count] (count ≤ s, its owned
                            // part); every rank receives into full[offset..offset+count],
                            // inside `full`; NCCL reads sendbuff on the root only.
                            let status = unsafe {
                                (api.broadcast)(
                                    send as *const c_void,
                                    at(full, offset) as *mut c_void,
                                    count,
                                    dtype,
                                    root as c_int,
                                    comm,
                                    stream,
                                )
                            };
                            api.check(&format!("ncclBroadcast (root {root})"), status, comm)?;
                        }
                        Ok(())
                    })
                })
            }
        }
    }

    fn take_traffic(&mut self) -> Traffic {
        std::mem::take(&mut self.traffic)
    }

    /// Free device memory on this rank's GPU before minus after the communicators were made
    /// (`cuMemGetInfo`, device-wide: a cross-check of NCCL's own buffers, not a figure).
    fn device_buffers(&self) -> Option<u64> {
        self.group.buffers.get(self.rank).copied().flatten()
    }

    /// Marks the group abandoned, so every rank's next collective returns an error instead
    /// of enqueueing work that would wait for this rank forever, and aborts (ncclCommAbort)
    /// every communicator not inside a call: NCCL's kernels poll the abort flag, so a rank
    /// blocked in a stream synchronization behind a collective that waits for this rank is
    /// released, as PyTorch's NCCL watchdog releases them. A communicator inside a call is
    /// aborted by its own rank when the call returns.
    fn abandon(&mut self, why: &str) {
        let idle: Vec<usize> = {
            let mut st = self.group.lock();
            st.abandoned
                .get_or_insert_with(|| format!("rank {} failed: {why}", self.rank));
            let idle = (0..st.slots.len())
                .filter(|&r| st.slots[r] == Slot::Idle)
                .collect::<Vec<_>>();
            for &r in &idle {
                st.slots[r] = Slot::Gone;
            }
            idle
        };
        for r in idle {
            self.group.abort(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where libnccl.so.2 is absent (this is checked on every machine the tests run on) the
    /// answer is a skip with the reason, never cudarc's panic; where it is present, its
    /// version is one this module can drive.
    #[test]
    fn loading_says_why_or_gives_a_usable_version() {
        match api() {
            Ok(api) => assert!((api.version.0, api.version.1) >= OLDEST_VERSION),
            Err(Error::Unsupported(why)) => {
                assert!(
                    why.starts_with("NCCL could not be loaded (libnccl.so.2 "),
                    "{why}"
                );
                assert!(why.contains("libnccl"), "{why}");
            }
            Err(e) => panic!("not a skip: {e}"),
        }
    }

    #[test]
    fn host_ranks_are_refused_before_nccl_is_touched() {
        let cpu = crate::backend::cpu::CpuBackend::new(None, None);
        match group(&[&cpu as &dyn Backend]) {
            Err(Error::Invalid(why)) => {
                assert!(why.contains("rank 0 is on the cpu backend"), "{why}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a communicator over host memory"),
        }
        assert!(matches!(group(&[]), Err(Error::Invalid(_))));
    }

    #[test]
    fn versions_decode_both_encodings() {
        assert_eq!(decode_version(22105), (2, 21, 5));
        assert_eq!(decode_version(23004), (2, 30, 4));
        assert_eq!(decode_version(2804), (2, 8, 4));
    }

    #[test]
    fn an_even_split_is_one_collective() {
        assert_eq!(plan(12, 4), Plan::Even { count: 3 });
        assert_eq!(plan(7, 1), Plan::Even { count: 7 });
        assert_eq!(plan(0, 3), Plan::Nothing);
    }

    /// Ragged: the roots' parts tile [0, len) in rank order, each at most a shard long,
    /// and ranks that own nothing are left out (every rank skips the same ones).
    #[test]
    fn a_ragged_split_covers_every_element_once() {
        for (len, world) in [(10, 4), (5, 4), (1, 3), (9, 8), (1003, 7)] {
            let Plan::PerRoot(roots) = plan(len, world) else {
                panic!("{len} over {world} is not ragged");
            };
            let s = shard_len(len, world);
            let mut next = 0;
            for (i, &(root, offset, count)) in roots.iter().enumerate() {
                assert_eq!(root, i, "{len}/{world}: roots in rank order from 0");
                assert_eq!(offset, next, "{len}/{world}: root {root}");
                assert!(count > 0 && count <= s, "{len}/{world}: root {root}");
                next += count;
            }
            assert_eq!(next, len, "{len}/{world}");
        }
        // 5 over 4: shards of 2, so ranks 0..2 own 2, 2, 1 and rank 3 nothing.
        assert_eq!(
            plan(5, 4),
            Plan::PerRoot(vec![(0, 0, 2), (1, 2, 2), (2, 4, 1)])
        );
    }
}
