package daemon

import (
	"fmt"
	"sync"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// RealtimeConfig is the [realtime] table: scheduling of the two threads a
// block crosses (the source's and the stages', which is Python's).
type RealtimeConfig struct {
	// Priority, 1–99, runs those two threads SCHED_FIFO at that priority
	// (needs CAP_SYS_NICE or RLIMIT_RTPRIO ≥ Priority; the systemd unit
	// allows up to 90). 0 leaves normal scheduling.
	Priority int `toml:"priority"`
	// LockMemory locks all of ephysd's memory in RAM (mlockall), so no
	// page fault ever waits for the disk on the hot path.
	LockMemory bool `toml:"lock_memory"`
	// CPUs pins those two threads to these CPUs (e.g. [1]); empty: any.
	CPUs []int `toml:"cpus"`
}

// applyPreset applies [pipeline] preset = "closed_loop" to the keys the
// file leaves out: blocks of one sample, the source read on the stage
// thread, realtime priority and locked memory.
func (c *Config) applyPreset(data []byte) error {
	switch c.Pipeline.Preset {
	case "":
		return nil
	case "closed_loop":
		if c.Pipeline.BlockSamples == 0 {
			c.Pipeline.BlockSamples = 1
		}
		if lineOf(data, "inline") == 0 {
			c.Pipeline.Inline = true
		}
		if lineOf(data, "priority") == 0 {
			c.Realtime.Priority = 50
		}
		if lineOf(data, "lock_memory") == 0 {
			c.Realtime.LockMemory = true
		}
		return nil
	}
	return &ConfigError{File: c.path, Line: lineOf(data, "preset"), Key: "pipeline.preset",
		Msg: fmt.Sprintf("%q: the only preset is \"closed_loop\"", c.Pipeline.Preset)}
}

// realtimeSetup applies [realtime] to the calling thread (the runner calls
// it on its source and stage threads). What the process may not do is
// logged once, and ephysd runs on with normal scheduling.
type realtimeSetup struct {
	cfg  RealtimeConfig
	log  *zap.Logger
	once sync.Map // message → struct{}
}

func (r *realtimeSetup) warnOnce(msg string, fields ...zap.Field) {
	if _, dup := r.once.LoadOrStore(msg, struct{}{}); !dup {
		r.log.Warn(msg, fields...)
	}
}

// thread sets the calling OS thread's scheduling (role: "source" or
// "stages") and returns what puts it back, so that the thread can return
// to Go's pool as it was.
func (r *realtimeSetup) thread(role string) (restore func()) {
	tid := unix.Gettid()
	var orig unix.CPUSet
	haveOrig := unix.SchedGetaffinity(tid, &orig) == nil
	restore = func() {
		param := struct{ priority int32 }{0}
		unix.RawSyscall(unix.SYS_SCHED_SETSCHEDULER, uintptr(tid), uintptr(unix.SCHED_NORMAL), uintptr(unsafe.Pointer(&param)))
		if haveOrig && len(r.cfg.CPUs) > 0 {
			unix.SchedSetaffinity(tid, &orig)
		}
	}
	if len(r.cfg.CPUs) > 0 {
		var set unix.CPUSet
		for _, c := range r.cfg.CPUs {
			set.Set(c)
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil {
			r.warnOnce("could not pin the acquisition threads to the configured CPUs", zap.Ints("cpus", r.cfg.CPUs), zap.Error(err))
		}
	}
	if r.cfg.Priority > 0 {
		// SCHED_RESET_ON_FORK: threads the Go runtime might create from
		// this one start with normal scheduling, so no realtime thread
		// ever joins Go's pool.
		param := struct{ priority int32 }{int32(r.cfg.Priority)}
		_, _, errno := unix.RawSyscall(unix.SYS_SCHED_SETSCHEDULER, uintptr(tid), uintptr(unix.SCHED_FIFO|unix.SCHED_RESET_ON_FORK), uintptr(unsafe.Pointer(&param)))
		if errno != 0 {
			var lim unix.Rlimit
			unix.Getrlimit(unix.RLIMIT_RTPRIO, &lim)
			r.warnOnce("realtime priority not permitted: running with normal scheduling (give ephysd CAP_SYS_NICE, or an RLIMIT_RTPRIO of at least the priority — the systemd unit sets LimitRTPRIO=90)",
				zap.Int("priority", r.cfg.Priority), zap.Uint64("rlimit_rtprio", lim.Cur), zap.Error(errno))
			return restore
		}
		r.log.Debug("realtime priority set", zap.String("thread", role), zap.Int("tid", tid), zap.Int("priority", r.cfg.Priority))
	}
	return restore
}

// lockMemory locks the process's memory (mlockall), or says once why not.
//
// Pages are locked as they are first touched (MCL_ONFAULT), not all at
// once: the block pool is touched when it is made (pipeline.NewPool), so
// the hot path never faults, and a touched page is never paged out, but
// the untouched rest of a mapping stays free. Without it every thread the
// Go runtime adds later (when several block in system calls at once) pins
// its whole 8 MB stack, and the resident size grows by 8 MB at each new
// high-water mark of threads.
func lockMemory(log *zap.Logger) {
	err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT)
	if err == unix.EINVAL { // a kernel before 4.4
		err = unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE)
	}
	if err != nil {
		var lim unix.Rlimit
		unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim)
		log.Warn("could not lock memory (mlockall): page faults may delay blocks (raise RLIMIT_MEMLOCK — the systemd unit sets LimitMEMLOCK=infinity)",
			zap.Uint64("rlimit_memlock", lim.Cur), zap.Error(err))
		return
	}
	log.Info("memory locked (mlockall)")
}
