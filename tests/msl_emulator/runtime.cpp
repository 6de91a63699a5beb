// Scheduler of the MSL-on-CPU emulator: one fiber per GPU thread, SIMD groups of 32 lanes whose
// collectives complete only when every lane of the group reaches the same call site, threadgroup
// barriers, shared poisoned threadgroup memory, a shadow-memory race detector, several thread
// orders per launch, and all of it in a forked child so that a crashing kernel cannot take the
// test process down.
//
// Its own translation unit, linked with each kernel's (build.py): the kernel-only rules at the end
// of msl.h (address-space macros, no `double`) do not apply here.
#include <algorithm>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <execinfo.h>
#include <map>
#include <unordered_map>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>
#define MSL_EMULATOR_RUNTIME
#include "msl.h"
// Fibers switch stacks with a few instructions on x86-64, with ucontext elsewhere (or when
// MSL_EMULATOR_UCONTEXT is defined, to test that path).
#if defined(__x86_64__) && !defined(MSL_EMULATOR_UCONTEXT)
#define MSL_FAST_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace msl {

// ---------------------------------------------------------------- interface with Python
// Mirrored by ctypes in launch.py.
struct Launch {
  const char* kernel;
  int buffers;
  const char* const* names;
  const char* const* spaces;  // "device" / "constant" per buffer
  const int64_t* bytes;
  void* const* data;          // [orders][buffers]
  uint8_t* const* shadow;     // [orders][buffers], nullptr for inputs
  int orders;
  uint32_t grid[3], group[3];
  int timeout_s;
  char* error;  // [orders][error_size], shared with the parent
  int error_size;
  int64_t* counters;  // nullptr, or the launch counters of the first order (layout: Counters)
  int counter_slots;
};

// ---------------------------------------------------------------- launch counters
// Written by the first thread order into Launch::counters, read by launch.py (`profile`):
//   [kBarriers] barriers completed, summed over threadgroups; [kBarriersMax] the most in one
//   threadgroup; [kThreadgroupBytes] the most threadgroup memory one threadgroup allocated;
//   [kSites] threadgroup-memory access sites recorded, [kSitesDropped] sites past the table;
//   [kProducts] 8 x 8 simdgroup matrix products, summed; [kProductsMax] the most in one
//   threadgroup; then per buffer kBufferFields values (bytes read, bytes written, distinct bytes
//   read, distinct bytes written: each byte once however often it is accessed); then per site
//   kSiteFields values: offset of the access in this library, lane accesses, SIMD steps, steps
//   with a bank conflict, extra wavefronts (sum of degree - 1), worst degree.
enum Counters {
  kBarriers, kBarriersMax, kThreadgroupBytes, kSites, kSitesDropped, kProducts, kProductsMax,
  kHeader = 8
};
constexpr int kBufferFields = 4;
constexpr int kSiteFields = 6;
constexpr int kBanks = 32;  // Apple GPUs' threadgroup memory: 32 banks of 4-byte words

// One lane's access to threadgroup memory at a site (bytes from the arena's start).
struct LaneAccess {
  uint32_t byte;
  uint32_t size;
};
// A site's accesses in one SIMD group, per lane in program order: the lanes' i-th accesses
// form the i-th SIMD step (the lockstep model, docs/ARCHITECTURE.md §8).
struct SiteLanes {
  std::vector<LaneAccess> lanes[32];
};
struct SiteStats {
  int64_t accesses = 0, steps = 0, conflicted = 0, extra = 0, worst = 0;
};

// ---------------------------------------------------------------- fibers
constexpr size_t kStack = 256 * 1024;
constexpr size_t kThreadgroupMemory = 32 * 1024;  // Apple GPUs' limit

enum class State { runnable, at_simd, at_barrier, done };

// ---------------------------------------------------------------- race detector: state
// Happens-before as Metal defines it inside a threadgroup: a threadgroup_barrier with
// mem_threadgroup (mem_device) orders every access to threadgroup (device) memory before it
// against every access after it; a SIMD-group function or simdgroup_barrier orders the accesses of
// the lanes of its SIMD group. Epochs count those syncs: two accesses by different threads are
// ordered iff the threadgroup's epoch moved between them, or the threads share a SIMD group and its
// epoch moved. Nothing orders threads of different threadgroups.
//
// An access is seen when the kernel takes the element's reference; whether it was a read or a write
// is settled at the thread's next tracked access or sync (no other thread runs in between): a write
// is a store that changed the bytes (a store of the value already there counts as a read).
struct Access {
  char* address = nullptr;  // nullptr: none pending
  const Region* region;     // the output, or nullptr for threadgroup memory
  uint32_t size;
  uint32_t site;  // return address of the track_ hook, as an offset into this library
  uint8_t before[kTrackedBytes];
};

struct Reader {
  uint16_t thread = 0;  // thread_index_in_threadgroup + 1; 0: none
  uint32_t site = 0;
};

// Per 4-byte word of threadgroup memory (per byte once an access covered part of the word), for
// the accesses since the last threadgroup barrier (`epoch`).
struct SharedCell {
  uint32_t epoch = 0;
  uint16_t writer = 0;  // thread + 1
  uint32_t write_site = 0;
  uint32_t write_simd_epoch = 0;
  uint32_t read_groups = 0;  // a bit per SIMD group that read it
  Reader first, other_group;  // the first reader, the first reader in another SIMD group
  uint32_t read_simd_epoch = 0;  // the SIMD-group epoch of the latest reads (one group read it)
  Reader latest[2];  // two distinct readers at read_simd_epoch
};

// Per byte of an output: its last writer in the launch.
struct OutputCell {
  uint32_t group = 0;  // threadgroup (linear index) + 1; 0: never written
  uint16_t thread;
  uint32_t site;
  uint32_t epoch;  // device epoch of the write
  uint32_t simd_epoch;
};

struct Fiber {
#ifdef MSL_FAST_SWITCH
  void* sp;
#else
  ucontext_t context;
#endif
  char* stack;
  State state;
  Attrs attrs;
  const Site* site;  // where it waits
  const char* op;
  unsigned flags;  // of the barrier it waits at
  void* args;
  Combine combine;
  Access pending;  // its latest tracked access, read or write not yet known
};

struct Run {
  const Launch* launch;
  int order;
  std::vector<Region> regions;       // per buffer
  std::vector<Fiber> fibers;         // per thread of the threadgroup
  int threads, simdgroups;
  Fiber* current = nullptr;
  const char* order_name = "";
  char* error = nullptr;  // this order's part of Launch::error
  uint64_t rng = 0;
  // threadgroup memory
  char* arena = nullptr;
  size_t arena_used = 0;
  uint8_t poison = 0xff;
  std::vector<void*> slots;
  std::vector<Region> arena_regions;
  // race detector
  std::vector<SharedCell> word_cells;                 // per arena word
  std::vector<SharedCell> byte_cells;                 // per arena byte, where split_words is set
  std::vector<bool> split_words;                      // words accessed in parts
  std::vector<std::vector<OutputCell>> output_cells;  // per buffer, per byte (outputs only)
  uint32_t shared_epoch = 0, device_epoch = 0;        // move at barriers and threadgroup starts
  uint32_t simd_epochs[32] = {};                      // per SIMD group, move at its syncs
  uint32_t group_index = 0;                           // linear index of the running threadgroup
  char* library_base = nullptr;
  // launch counters (first order only)
  bool counting = false;
  int64_t barriers = 0, barriers_max = 0, group_barriers = 0, threadgroup_bytes = 0;
  int64_t products = 0, products_max = 0, group_products = 0;
  std::vector<std::vector<uint8_t>> touched;  // per buffer, per byte: Region::touched
  std::vector<std::unordered_map<uint32_t, SiteLanes>> bank_sites;  // per SIMD group
  std::map<uint32_t, SiteStats> site_stats;                          // per site, whole launch
#ifdef MSL_FAST_SWITCH
  void* scheduler_sp;
#else
  ucontext_t scheduler;
#endif
};
Run* run_ = nullptr;

#ifdef MSL_FAST_SWITCH
// switch_stack(&save, target): saves the callee-saved registers on the current stack, stores
// its pointer in *save, and resumes the stack `target` the same way. The floating-point control
// registers (MXCSR, x87) are shared by all fibers: kernels do not change them.
extern "C" void msl_switch_stack(void** save, void* target);
asm(R"(
.text
.p2align 4
.type msl_switch_stack,@function
msl_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size msl_switch_stack,.-msl_switch_stack
)");
#endif

[[noreturn]] void fiber_main();

void start_fiber(Fiber& f) {
#ifdef MSL_FAST_SWITCH
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + kStack);
  top[-1] = 0;                                           // fake return address of fiber_main
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);     // where msl_switch_stack returns
  for (int i = 3; i <= 8; i++) top[-i] = 0;              // rbp rbx r12..r15
  f.sp = top - 8;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStack;
  f.context.uc_link = nullptr;
  makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

void resume(Fiber& f) {
  run_->current = &f;
#ifdef MSL_FAST_SWITCH
  msl_switch_stack(&run_->scheduler_sp, f.sp);
#else
  swapcontext(&run_->scheduler, &f.context);
#endif
  run_->current = nullptr;
}

void settle(Fiber& f);

void suspend() {
  Fiber& f = *run_->current;
  settle(f);
#ifdef MSL_FAST_SWITCH
  msl_switch_stack(&f.sp, run_->scheduler_sp);
#else
  swapcontext(&f.context, &run_->scheduler);
#endif
}

// ---------------------------------------------------------------- errors
int describe_thread(char* out, size_t size) {
  if (!run_ || !run_->current) return snprintf(out, size, "kernel '%s'", run_ ? run_->launch->kernel : "?");
  const Attrs& a = run_->current->attrs;
  return snprintf(out, size,
                  "kernel '%s', thread_position_in_grid (%u, %u, %u), threadgroup (%u, %u, %u), "
                  "thread_index_in_threadgroup %u (simdgroup %u, lane %u), %s thread order",
                  run_->launch->kernel, a.thread_position_in_grid.x, a.thread_position_in_grid.y,
                  a.thread_position_in_grid.z, a.threadgroup_position_in_grid.x,
                  a.threadgroup_position_in_grid.y, a.threadgroup_position_in_grid.z,
                  a.thread_index_in_threadgroup, a.simdgroup_index_in_threadgroup,
                  a.thread_index_in_simdgroup, run_->order_name);
}

// Appends "\n@frames <offset>..." (return addresses inside this library) for Python to map to
// .metal lines with addr2line.
void append_frames(char* out, size_t size) {
  void* frames[48];
  int count = backtrace(frames, 48);
  Dl_info self, frame;
  if (!dladdr(reinterpret_cast<void*>(&append_frames), &self)) return;
  size_t n = strlen(out);
  n += snprintf(out + n, size - n, "\n@frames");
  for (int i = 0; i < count && n < size; i++)
    if (dladdr(frames[i], &frame) && frame.dli_fbase == self.dli_fbase)
      n += snprintf(out + n, size - n, " %lx",
                    static_cast<unsigned long>(static_cast<char*>(frames[i]) -
                                               static_cast<char*>(self.dli_fbase) - 1));
}

// The failing thread, the message, and (with `frames`) where the thread is now.
[[noreturn]] void report(bool frames, const char* fmt, va_list args) {
  char* out = run_->error;
  size_t size = run_->launch->error_size;
  int n = describe_thread(out, size);
  n += snprintf(out + n, size - n, ": ");
  vsnprintf(out + n, size - n, fmt, args);
  if (frames) append_frames(out, size);
  _exit(3);
}

[[noreturn]] void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  report(true, fmt, args);
}

// As fail, for messages that name their places themselves as "@site:<offset>" (Python maps them
// to .metal lines): the thread has moved on from the access in question.
[[noreturn]] void fail_at_sites(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  report(false, fmt, args);
}

void on_signal(int signal) {
  char* out = run_->error;
  size_t size = run_->launch->error_size;
  int n = describe_thread(out, size);
  snprintf(out + n, size - n,
           ": crashed with signal %d (%s): a fiber stack overflow (%zu KB per thread), an "
           "out-of-bounds access through an unchecked thread-local pointer, or a bug of the "
           "emulator",
           signal, signal == SIGFPE ? "arithmetic exception" : "invalid memory access",
           kStack / 1024);
  append_frames(out, size);
  _exit(4);
}

const char* source_name(const Site& site) { return site.file_name(); }

const Region* find_region(const void* address) {
  const char* a = static_cast<const char*>(address);
  if (!run_) return nullptr;
  for (const Region& r : run_->arena_regions)
    if (a >= r.begin && a < r.end) return &r;
  for (const Region& r : run_->regions)
    if (a >= r.begin && a < r.end) return &r;
  return nullptr;
}

void out_of_bounds(const Region* region, const void* address, size_t element_size, const char* kind) {
  if (!region)
    fail("out-of-bounds access to a thread-local array (element %zu bytes at %p)", element_size, address);
  ptrdiff_t offset = static_cast<const char*>(address) - region->begin;
  ptrdiff_t bytes = region->end - region->begin;
  fail("out-of-bounds %s access to %s buffer '%s': element index %td (%zu-byte elements; byte "
       "offset %td) but the buffer holds %td bytes (%td elements)",
       kind, region->space, region->name, offset >= 0 ? offset / ptrdiff_t(element_size) : -1 - (-offset - 1) / ptrdiff_t(element_size),
       element_size, offset, bytes, bytes / ptrdiff_t(element_size));
}

void poison(void* memory, size_t bytes) { std::memset(memory, run_->poison, bytes); }

void* threadgroup_alloc(int slot, size_t bytes, const char* name) {
  Run& r = *run_;
  if (size_t(slot) >= r.slots.size()) r.slots.resize(slot + 1, nullptr);
  if (!r.slots[slot]) {
    size_t start = (r.arena_used + 15) & ~size_t(15);
    if (start + bytes > kThreadgroupMemory)
      fail("threadgroup memory exceeds %zu bytes at '%s' (%zu bytes wanted, %zu in use)",
           kThreadgroupMemory, name, bytes, start);
    if (r.arena_regions.size() == r.arena_regions.capacity())  // ptr holds Region pointers
      fail("more than %zu threadgroup variables", r.arena_regions.capacity());
    r.slots[slot] = r.arena + start;
    r.arena_used = start + bytes;
    std::memset(r.arena + start, r.poison, bytes);
    r.arena_regions.push_back(
        {r.arena + start, r.arena + start + bytes, name, "threadgroup", nullptr, false});
  }
  return r.slots[slot];
}

int lane_id() { return run_->current->attrs.thread_index_in_simdgroup; }

int width_of(int simdgroup) {
  return std::min(32, run_->threads - simdgroup * 32);
}
int simd_width() { return width_of(run_->current->attrs.simdgroup_index_in_threadgroup); }

// ---------------------------------------------------------------- collectives
void count_matrix_product() {
  if (run_->counting) run_->group_products++;
}

void simd_collective(const Site& site, const char* op, void* args, Combine combine) {
  Fiber& f = *run_->current;
  f.state = State::at_simd;
  f.site = &site;
  f.op = op;
  f.args = args;
  f.combine = combine;
  suspend();
}

void threadgroup_sync(const Site& site, unsigned flags) {
  Fiber& f = *run_->current;
  f.state = State::at_barrier;
  f.site = &site;
  f.op = "threadgroup_barrier";
  f.flags = flags;
  suspend();
}

// ---------------------------------------------------------------- race detector: checks
uint32_t site_of(void* return_address) {
  return uint32_t(static_cast<char*>(return_address) - run_->library_base - 1);
}

void track(const Region* output, const void* address, size_t size, uint32_t site) {
  Fiber& f = *run_->current;
  settle(f);
  Access& a = f.pending;
  a.address = static_cast<char*>(const_cast<void*>(address));
  a.region = output;
  a.size = uint32_t(size);
  a.site = site;
  if (size == 4) std::memcpy(a.before, address, 4);  // a constant size needs no call
  else std::memcpy(a.before, address, size);
}

void track_threadgroup(const void* address, size_t size) {
  uint32_t site = site_of(__builtin_return_address(0));
  Run& r = *run_;
  if (r.counting) {
    const Attrs& a = r.current->attrs;
    r.bank_sites[a.simdgroup_index_in_threadgroup][site].lanes[a.thread_index_in_simdgroup].push_back(
        {uint32_t(static_cast<const char*>(address) - r.arena), uint32_t(size)});
  }
  track(nullptr, address, size, site);
}

void track_output(const Region* region, const void* address, size_t size) {
  track(region, address, size, site_of(__builtin_return_address(0)));
}

int group_of(uint16_t thread) { return (thread - 1) / 32; }

// "thread_index_in_threadgroup 70 (simdgroup 2, lane 6)" for a stored thread + 1.
const char* name_thread(uint16_t thread, char* buf, size_t size) {
  snprintf(buf, size, "thread_index_in_threadgroup %u (simdgroup %u, lane %u)", thread - 1u,
           (thread - 1u) / 32, (thread - 1u) % 32);
  return buf;
}

// Sites are printed as "@site:<offset>" for Python to map to .metal lines.
[[noreturn]] void race(const Region* region, const Access& a, bool wrote, const char* other,
                       bool other_wrote, uint32_t other_site, const char* why) {
  if (!region) region = find_region(a.address);
  ptrdiff_t element = (a.address - region->begin) / ptrdiff_t(a.size);
  fail_at_sites("data race on %s %s '%s' element %td (%u-byte elements): this thread %s at "
                "@site:%x and %s %s it at @site:%x, %s: the result depends on the thread order "
                "on the GPU",
                region->space, region->output ? "output" : "array", region->name, element, a.size,
                wrote ? "writes it" : "reads it (or stores the value it holds)", a.site, other,
                other_wrote ? "wrote" : "read", other_site, why);
}

const char* kUnorderedInGroup = "with no threadgroup_barrier(mem_threadgroup), SIMD-group "
                                "function or simdgroup_barrier in between";
const char* kUnorderedGroups = "in another SIMD group, with no threadgroup_barrier(mem_threadgroup) "
                               "in between";

void settle_shared(Fiber& f, const Access& a, bool wrote) {
  Run& r = *run_;
  const uint16_t me = uint16_t(f.attrs.thread_index_in_threadgroup + 1);
  const int group = f.attrs.simdgroup_index_in_threadgroup;
  const uint32_t simd_epoch = r.simd_epochs[group];
  const Region* region = nullptr;  // found when reporting
  char other[96];
  auto unordered = [&](uint16_t thread, uint32_t epoch) {
    return group_of(thread) != group ? kUnorderedGroups : epoch == simd_epoch ? kUnorderedInGroup
                                                                               : nullptr;
  };
  auto settle_cell = [&](SharedCell& c) {
    if (c.epoch != r.shared_epoch) {
      c = SharedCell{};
      c.epoch = r.shared_epoch;
    }
    if (c.writer && c.writer != me) {
      if (const char* why = unordered(c.writer, c.write_simd_epoch))
        race(region, a, wrote, name_thread(c.writer, other, sizeof other), true, c.write_site, why);
    }
    if (wrote) {
      Reader reader;
      if (c.read_groups & ~(1u << group))  // read in another SIMD group
        reader = group_of(c.first.thread) != group ? c.first : c.other_group;
      else if (c.read_groups && c.read_simd_epoch == simd_epoch)
        reader = c.latest[0].thread != me ? c.latest[0] : c.latest[1];
      if (reader.thread)
        race(region, a, true, name_thread(reader.thread, other, sizeof other), false, reader.site,
             unordered(reader.thread, c.read_simd_epoch));
      c = SharedCell{};  // the earlier reads are ordered before this write
      c.epoch = r.shared_epoch;
      c.writer = me;
      c.write_site = a.site;
      c.write_simd_epoch = simd_epoch;
      return;
    }
    if (!c.read_groups) c.first = {me, a.site};
    else if (!c.other_group.thread && group_of(c.first.thread) != group) c.other_group = {me, a.site};
    c.read_groups |= 1u << group;
    if (!c.latest[0].thread || c.read_simd_epoch != simd_epoch) {
      c.read_simd_epoch = simd_epoch;
      c.latest[0] = {me, a.site};
      c.latest[1] = {};
    } else if (c.latest[0].thread != me && !c.latest[1].thread) {
      c.latest[1] = {me, a.site};
    }
  };
  const size_t begin = a.address - r.arena, end = begin + a.size;
  const bool whole_words = begin % 4 == 0 && a.size % 4 == 0;
  for (size_t word = begin / 4; word < (end + 3) / 4; word++) {
    if (!r.split_words[word]) {
      if (whole_words) {
        settle_cell(r.word_cells[word]);
        continue;
      }
      for (size_t byte = 4 * word; byte < 4 * word + 4; byte++) r.byte_cells[byte] = r.word_cells[word];
      r.split_words[word] = true;
    }
    for (size_t byte = std::max(begin, 4 * word); byte < std::min(end, 4 * word + 4); byte++)
      settle_cell(r.byte_cells[byte]);
  }
}

// Outputs: no two threads write the same element, and no thread reads an element another thread
// wrote unless a threadgroup_barrier(mem_device) or a sync of their SIMD group ordered them.
void settle_output(Fiber& f, const Access& a, bool wrote) {
  Run& r = *run_;
  const Region* region = a.region;
  const uint16_t me = uint16_t(f.attrs.thread_index_in_threadgroup + 1);
  const int group = f.attrs.simdgroup_index_in_threadgroup;
  const uint32_t simd_epoch = r.simd_epochs[group];
  std::vector<OutputCell>& cells = r.output_cells[region - r.regions.data()];
  for (char* byte = a.address; byte < a.address + a.size; byte++) {
    OutputCell& c = cells[byte - region->begin];
    bool ordered = c.group == r.group_index + 1 &&
                   (c.thread == me || c.epoch != r.device_epoch ||
                    (group_of(c.thread) == group && c.simd_epoch != simd_epoch));
    if (c.group && !ordered) {
      char other[256];
      const Launch& L = *r.launch;
      uint32_t counts[3], gp[3], size[3], t = c.thread - 1u, g = c.group - 1;
      for (int d = 0; d < 3; d++) counts[d] = (L.grid[d] + L.group[d] - 1) / L.group[d];
      gp[0] = g % counts[0], gp[1] = (g / counts[0]) % counts[1], gp[2] = g / (counts[0] * counts[1]);
      for (int d = 0; d < 3; d++) size[d] = std::min(L.group[d], L.grid[d] - gp[d] * L.group[d]);
      snprintf(other, sizeof other,
               "thread_position_in_grid (%u, %u, %u) (threadgroup (%u, %u, %u), "
               "thread_index_in_threadgroup %u)",
               gp[0] * L.group[0] + t % size[0], gp[1] * L.group[1] + (t / size[0]) % size[1],
               gp[2] * L.group[2] + t / (size[0] * size[1]), gp[0], gp[1], gp[2], t);
      race(region, a, wrote, other, true, c.site,
           wrote ? "two threads write the same output element"
                 : "a kernel has no grid-wide synchronisation (and within a threadgroup only "
                   "threadgroup_barrier(mem_device) or a sync of the SIMD group orders them)");
    }
    if (wrote) c = {r.group_index + 1, me, a.site, r.device_epoch, simd_epoch};
  }
  count_device_access(region, a.address, a.size, wrote);
}

template <class U>
bool differs(const Access& a) {  // memcmp without a call, for the common sizes
  U now, before;
  std::memcpy(&now, a.address, sizeof now);
  std::memcpy(&before, a.before, sizeof before);
  return now != before;
}

// Settles the fiber's pending access as a read or a write and checks it.
void settle(Fiber& f) {
  Access& a = f.pending;
  if (!a.address) return;
  bool wrote = a.size == 4 ? differs<uint32_t>(a) : a.size == 2 ? differs<uint16_t>(a)
                                                  : std::memcmp(a.address, a.before, a.size) != 0;
  if (a.region) settle_output(f, a, wrote);
  else settle_shared(f, a, wrote);
  a.address = nullptr;
}

bool same_site(const Fiber& a, const Fiber& b) {
  const Site &x = *a.site, &y = *b.site;
  if (x.line() != y.line() || x.column() != y.column()) return false;
  return (x.file_name() == y.file_name() || std::strcmp(x.file_name(), y.file_name()) == 0) &&
         (x.function_name() == y.function_name() ||
          std::strcmp(x.function_name(), y.function_name()) == 0);
}

const char* where(const Fiber& f, char* buf, size_t size) {
  if (f.state == State::done) snprintf(buf, size, "returned from the kernel");
  else snprintf(buf, size, "at %s (%s:%u:%u)", f.op, f.site->file_name(), f.site->line(), f.site->column());
  return buf;
}

[[noreturn]] void fail_divergent(Fiber& waiting, Fiber& other, const char* what) {
  char a[256], b[256];
  run_->current = &waiting;
  fail("%s: this thread is %s while thread_index_in_threadgroup %u is %s", what,
       where(waiting, a, sizeof a), other.attrs.thread_index_in_threadgroup, where(other, b, sizeof b));
}

// Completes the SIMD group's collective if all of its lanes wait at the same one.
bool resolve_simdgroup(int g) {
  Run& r = *run_;
  Fiber* lanes = &r.fibers[g * 32];
  int n = width_of(g);
  Fiber* waiting = nullptr;
  for (int i = 0; i < n; i++)
    if (lanes[i].state == State::at_simd) { waiting = &lanes[i]; break; }
  if (!waiting) return false;
  for (int i = 0; i < n; i++) {
    Fiber& l = lanes[i];
    if (l.state == State::runnable) return false;
    if (l.state == State::done)
      fail_divergent(*waiting, l, "SIMD-group function in divergent control flow (a lane has exited)");
    if (l.state == State::at_barrier)
      fail_divergent(*waiting, l, "SIMD-group function in divergent control flow");
    if (!same_site(l, *waiting) || l.combine != waiting->combine)
      fail_divergent(*waiting, l, "SIMD-group function in divergent control flow (lanes at different call sites)");
  }
  void* args[32];
  for (int i = 0; i < n; i++) args[i] = lanes[i].args;
  r.current = waiting;  // for errors raised while combining
  waiting->combine(args, n);
  r.current = nullptr;
  r.simd_epochs[g]++;
  for (int i = 0; i < n; i++) lanes[i].state = State::runnable;
  return true;
}

// The fibers of the current threadgroup (an edge threadgroup may have fewer threads).
struct Active {
  Fiber* first;
  int count;
  Fiber* begin() const { return first; }
  Fiber* end() const { return first + count; }
};
Active active(Run& r) { return {r.fibers.data(), r.threads}; }

bool resolve_barrier() {
  Run& r = *run_;
  Fiber* waiting = nullptr;
  for (Fiber& f : active(r))
    if (f.state == State::at_barrier) { waiting = &f; break; }
  if (!waiting) return false;
  for (Fiber& f : active(r)) {
    if (f.state == State::runnable || f.state == State::at_simd) return false;
    if (f.state == State::done)
      fail_divergent(*waiting, f, "threadgroup_barrier not reached by every thread (an early return?)");
    if (!same_site(f, *waiting))
      fail_divergent(*waiting, f, "threads wait at different threadgroup_barrier calls");
  }
  if (waiting->flags & unsigned(metal::mem_flags::mem_threadgroup)) r.shared_epoch++;
  if (waiting->flags & unsigned(metal::mem_flags::mem_device)) r.device_epoch++;
  r.group_barriers++;
  for (Fiber& f : active(r)) f.state = State::runnable;
  return true;
}

uint64_t next_random() {
  uint64_t& x = run_->rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

template <class T>
void shuffle(std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[next_random() % i]);
}

// Thread orders: 0 forward, 1 reverse, k >= 2 a shuffle seeded by k (redrawn at every step).
void arrange(std::vector<int>& order) {
  for (size_t i = 0; i < order.size(); i++) order[i] = int(i);
  if (run_->order == 1) std::reverse(order.begin(), order.end());
  else if (run_->order >= 2) shuffle(order);
}

extern "C" void run_thread(void* const* buffers, const Region* regions, const Attrs& attrs);

// Bank conflicts of one SIMD step: the most distinct 4-byte words the lanes' accesses put in one
// bank (1: none; lanes reading the same word share it, a broadcast).
int64_t conflict_degree(std::vector<uint32_t>& words) {
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  int per_bank[kBanks] = {};
  int worst = 0;
  for (uint32_t w : words) worst = std::max(worst, ++per_bank[w % kBanks]);
  return worst;
}

// Folds this threadgroup's threadgroup-memory accesses and barriers into the launch counters.
void count_threadgroup(Run& r) {
  r.barriers += r.group_barriers;
  r.barriers_max = std::max(r.barriers_max, r.group_barriers);
  r.products += r.group_products;
  r.products_max = std::max(r.products_max, r.group_products);
  r.threadgroup_bytes = std::max(r.threadgroup_bytes, int64_t(r.arena_used));
  std::vector<uint32_t> words;
  for (auto& sites : r.bank_sites) {
    for (auto& [site, lanes] : sites) {
      SiteStats& stats = r.site_stats[site];
      size_t steps = 0;
      for (auto& lane : lanes.lanes) {
        steps = std::max(steps, lane.size());
        stats.accesses += lane.size();
      }
      for (size_t step = 0; step < steps; step++) {
        words.clear();
        for (auto& lane : lanes.lanes) {
          if (step >= lane.size()) continue;
          const LaneAccess& a = lane[step];
          for (uint32_t w = a.byte / 4; w < (a.byte + a.size + 3) / 4; w++) words.push_back(w);
        }
        int64_t degree = conflict_degree(words);
        stats.steps++;
        stats.conflicted += degree > 1;
        stats.extra += degree - 1;
        stats.worst = std::max(stats.worst, degree);
      }
    }
    sites.clear();
  }
}

void write_counters(Run& r) {
  const Launch& L = *r.launch;
  int64_t* out = L.counters;
  out[kBarriers] = r.barriers;
  out[kBarriersMax] = r.barriers_max;
  out[kProducts] = r.products;
  out[kProductsMax] = r.products_max;
  out[kThreadgroupBytes] = r.threadgroup_bytes;
  for (int b = 0; b < L.buffers; b++) {
    int64_t* fields = out + kHeader + kBufferFields * b;
    fields[0] = int64_t(r.regions[b].read_bytes);
    fields[1] = int64_t(r.regions[b].written_bytes);
    fields[2] = fields[3] = 0;
    for (uint8_t how : r.touched[b]) {
      fields[2] += (how & kTouchedRead) != 0;
      fields[3] += (how & kTouchedWritten) != 0;
    }
  }
  int64_t* site = out + kHeader + kBufferFields * L.buffers;
  const int64_t capacity = (L.counter_slots - kHeader - kBufferFields * L.buffers) / kSiteFields;
  for (auto& [offset, s] : r.site_stats) {
    if (out[kSites] == capacity) {
      out[kSitesDropped]++;
      continue;
    }
    int64_t fields[kSiteFields] = {offset, s.accesses, s.steps, s.conflicted, s.extra, s.worst};
    std::memcpy(site + kSiteFields * out[kSites]++, fields, sizeof fields);
  }
}

[[noreturn]] void fiber_main() {
  Fiber& f = *run_->current;
  run_thread(run_->launch->data + run_->order * run_->launch->buffers, run_->regions.data(), f.attrs);
  f.state = State::done;
  suspend();
  __builtin_unreachable();
}

void run_threadgroup(uint3 group_position) {
  Run& r = *run_;
  const Launch& L = *r.launch;
  uint3 size;
  for (int d = 0; d < 3; d++)
    size[d] = std::min(L.group[d], L.grid[d] - group_position[d] * L.group[d]);  // non-uniform edge
  r.threads = size.x * size.y * size.z;
  r.simdgroups = (r.threads + 31) / 32;
  r.arena_used = 0;
  r.slots.assign(r.slots.size(), nullptr);
  r.arena_regions.clear();
  r.shared_epoch++;  // nothing orders two threadgroups: no access of an earlier one counts
  r.device_epoch++;
  r.group_barriers = 0;
  r.group_products = 0;
  std::vector<int> order(r.threads);
  for (int t = 0; t < r.threads; t++) {
    Fiber& f = r.fibers[t];
    Attrs& a = f.attrs;
    a = Attrs{};
    a.thread_position_in_threadgroup = uint3(t % size.x, (t / size.x) % size.y, t / (size.x * size.y));
    a.threadgroup_position_in_grid = group_position;
    for (int d = 0; d < 3; d++) {
      a.thread_position_in_grid[d] = group_position[d] * L.group[d] + a.thread_position_in_threadgroup[d];
      a.threadgroups_per_grid[d] = (L.grid[d] + L.group[d] - 1) / L.group[d];
      a.threads_per_grid[d] = a.grid_size[d] = L.grid[d];
      a.dispatch_threads_per_threadgroup[d] = L.group[d];
    }
    a.threads_per_threadgroup = size;
    a.grid_origin = uint3(0u);
    a.thread_index_in_threadgroup = t;
    a.thread_index_in_simdgroup = t % 32;
    a.simdgroup_index_in_threadgroup = t / 32;
    a.threads_per_simdgroup = a.thread_execution_width = 32;
    a.simdgroups_per_threadgroup = a.dispatch_simdgroups_per_threadgroup = r.simdgroups;
    a.thread_index_in_quadgroup = t % 4;
    a.quadgroup_index_in_threadgroup = t / 4;
    a.quadgroups_per_threadgroup = a.dispatch_quadgroups_per_threadgroup = (r.threads + 3) / 4;
    f.state = State::runnable;
    f.pending.address = nullptr;
    start_fiber(f);
  }
  arrange(order);
  for (;;) {
    if (r.order >= 2) arrange(order);
    bool all_done = true;
    for (int t : order)
      if (r.fibers[t].state == State::runnable) resume(r.fibers[t]);
    bool progress = false;
    for (int g = 0; g < r.simdgroups; g++) progress |= resolve_simdgroup(g);
    progress |= resolve_barrier();
    for (Fiber& f : active(r)) all_done &= f.state == State::done;
    if (all_done) {
      if (r.counting) count_threadgroup(r);
      return;
    }
    if (!progress) {  // some wait forever: name one waiting thread and one it waits for
      Fiber* waiting = nullptr;
      for (Fiber& f : active(r))
        if (f.state == State::at_barrier) waiting = &f;
      for (Fiber& f : active(r))
        if (waiting && f.state != State::at_barrier) fail_divergent(*waiting, f, "deadlock");
      fail("deadlock in the emulator scheduler");
    }
  }
}

void run_order(Run& r) {
  const Launch& L = *r.launch;
  static const char* names[] = {"forward", "reverse"};
  char shuffled[32];
  snprintf(shuffled, sizeof shuffled, "shuffled (seed %d)", r.order);
  r.order_name = r.order < 2 ? names[r.order] : shuffled;
  r.rng = 0x9e3779b97f4a7c15ull * (r.order + 1);
  r.poison = uint8_t(0xff - r.order);  // NaN for floats in order 0, other garbage afterwards
  r.regions.resize(L.buffers);
  r.touched.resize(L.buffers);
  for (int b = 0; b < L.buffers; b++) {
    char* data = static_cast<char*>(L.data[r.order * L.buffers + b]);
    uint8_t* shadow = L.shadow[r.order * L.buffers + b];
    r.regions[b] = {data, data + L.bytes[b], L.names[b], L.spaces[b], shadow, shadow != nullptr};
    if (r.counting) {
      r.touched[b].assign(L.bytes[b], 0);
      r.regions[b].touched = r.touched[b].data();
    }
  }
  r.output_cells.resize(L.buffers);
  for (int b = 0; b < L.buffers; b++)
    if (r.regions[b].output && detect_output_races) r.output_cells[b].resize(L.bytes[b]);
  std::vector<int> groups;
  uint32_t counts[3];
  for (int d = 0; d < 3; d++) counts[d] = (L.grid[d] + L.group[d] - 1) / L.group[d];
  for (uint32_t i = 0; i < counts[0] * counts[1] * counts[2]; i++) groups.push_back(i);
  arrange(groups);
  for (int i : groups) {
    r.group_index = i;
    run_threadgroup(uint3(i % counts[0], (i / counts[0]) % counts[1], i / (counts[0] * counts[1])));
  }
  if (r.counting) write_counters(r);
}

}  // namespace msl

namespace msl {
[[noreturn]] void run_child(const Launch* launch, int order) {
  Run run;
  run_ = &run;
  run.launch = launch;
  run.order = order;
  run.error = launch->error + order * launch->error_size;
  run.fibers.resize(launch->group[0] * launch->group[1] * launch->group[2]);
  for (Fiber& f : run.fibers) {  // stacks with a guard page below each
    char* block = static_cast<char*>(mmap(nullptr, kStack + 4096, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    mprotect(block, 4096, PROT_NONE);
    f.stack = block + 4096;
  }
  run.arena = static_cast<char*>(aligned_alloc(64, kThreadgroupMemory));
  arena_begin = run.arena;
  arena_end = run.arena + kThreadgroupMemory;
  run.arena_regions.reserve(1024);  // never reallocated: ptr holds Region pointers
  detect_threadgroup_races = order == 0;
  detect_output_races = order < 2;
  run.counting = order == 0 && launch->counters;  // needs both detectors: their hooks count
  run.bank_sites.resize((run.fibers.size() + 31) / 32);
  if (detect_threadgroup_races) {
    run.word_cells.resize(kThreadgroupMemory / 4);
    run.byte_cells.resize(kThreadgroupMemory);
    run.split_words.resize(kThreadgroupMemory / 4);
  }
  Dl_info self;
  dladdr(reinterpret_cast<void*>(&append_frames), &self);
  run.library_base = static_cast<char*>(self.dli_fbase);
  static char signal_stack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = signal_stack;
  ss.ss_size = sizeof signal_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
  alarm(launch->timeout_s);
  run_order(run);
  _exit(0);
}
}  // namespace msl

// Runs each thread order of the launch in its own forked child (in parallel, and a crashing
// kernel cannot take the caller down). Returns 0 when all ran, 1 when the kernel failed a check
// or crashed, 2 when it ran out of time; the message of the first failing order is moved to the
// start of launch->error.
extern "C" __attribute__((visibility("default"))) int msl_emulate(const msl::Launch* launch) {
  std::vector<pid_t> children;
  for (int order = 0; order < launch->orders; order++) {
    pid_t child = fork();
    if (child == 0) msl::run_child(launch, order);
    children.push_back(child);
  }
  int result = 0;
  for (int order = 0; order < launch->orders; order++) {
    char* error = launch->error + order * launch->error_size;
    int status = 0;
    if (children[order] < 0) {
      snprintf(error, launch->error_size, "fork failed");
    } else {
      while (waitpid(children[order], &status, 0) < 0) {}
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
    }
    if (result) continue;  // an earlier order failed first
    result = WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM ? 2 : 1;
    if (error[0] == 0)
      snprintf(error, launch->error_size, "emulator child ended with status %d", status);
    std::memmove(launch->error, error, launch->error_size);
    for (int later = order + 1; later < launch->orders; later++)
      if (children[later] > 0) kill(children[later], SIGKILL);
  }
  return result;
}
