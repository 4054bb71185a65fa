// Package isolated runs a Python stage in a worker process of its own, so
// that a script that crashes its interpreter (a segfault in a C extension,
// os._exit, the out-of-memory killer) takes down only its worker: ephysd
// logs it, passes the data through unchanged, restarts the worker with
// backoff and keeps acquiring and recording without a gap.
//
// The parent side (Stage) is a pipeline.Stage with the same behaviour as
// pyrt.Stage: TTL and spike handlers before process, process in place,
// add_python_event with its sample number, the acquisition and recording
// hooks, reload, status, the block timeout. The worker (WorkerMain) is the
// ephysd binary re-executed as a hidden subcommand; it embeds Python with
// pyrt and serves one stage.
//
// Per block, the two processes share one memfd: the parent copies the
// block's samples and events in, wakes the worker with an eventfd and waits
// on a second eventfd for its answer — and on the worker's pidfd, so a
// death is noticed at once, and with a deadline, so a worker hung in native
// code is killed rather than waited for. The parent's block is only written
// when the worker answered: a worker dying half-way through a block leaves
// the block as it was. Everything else (configuration, reload, status, the
// worker's log lines) goes over a socket pair.
package isolated

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
)

// Config describes an isolated stage.
type Config struct {
	Stage pyrt.StageConfig

	// The worker's interpreter, as pyrt.Config.
	Executable     string
	Venv           string
	SwitchInterval time.Duration
	// BlockTimeout is the worker's limit for one call into the script
	// (pyrt.Config.BlockTimeout: 0 means 2 s, < 0 never): the worker's
	// interpreter interrupts it with TimeoutError. The parent waits
	// pyrt.MaxStall(BlockTimeout) + 250 ms for a block's answer — as long
	// as a hung call can hold up an in-process stage, and a little more: a
	// worker that has not answered by then is stuck where the interruption
	// cannot reach (native code), and is killed and restarted.
	BlockTimeout time.Duration
	// HookTimeout bounds start/stop_acquisition and start/stop_recording
	// the same way (default 10 s, at least the block deadline).
	HookTimeout time.Duration
	// StartTimeout bounds a worker's start: Python, numpy and the module's
	// import (default 60 s).
	StartTimeout time.Duration

	// Command returns a command that runs WorkerMain in a new process: the
	// ephysd binary's hidden subcommand WorkerRole (the daemon passes its
	// own). The stage adds the inherited files, output and process
	// attributes.
	Command func() (*exec.Cmd, error)

	// Restarts wait MinBackoff (default 100 ms), doubling up to MaxBackoff
	// (10 s); after a worker ran StableAfter (1 min) the wait starts over.
	MinBackoff, MaxBackoff, StableAfter time.Duration

	// BlockSamples sizes the shared data area for blocks of this many
	// samples (default 1024); larger blocks grow it.
	BlockSamples int

	Log *zap.Logger
}

// ErrWorkerDown is returned by requests while the stage's worker is down.
var ErrWorkerDown = errors.New("the stage's worker process is down (it is being restarted)")

// Stage is a Python stage run by a worker process. Process and the hooks
// run on the pipeline's stage thread; the other methods on any goroutine.
type Stage struct {
	cfg  Config
	name string
	log  *zap.Logger // tagged with the stage

	cur     atomic.Pointer[worker] // the running worker, nil while it is down
	kick    chan struct{}          // restart now (reload while down)
	closing chan struct{}
	stopped chan struct{}
	once    sync.Once

	// Stage thread only.
	attached  *worker
	acquiring bool
	recording *pipeline.Recording
	word      uint64 // the state of this stage's output lines
	spikes    spikeReader

	inDropped, outDropped pipeline.LogLimiter

	mu         sync.Mutex
	stageCfg   pyrt.StageConfig // path, channels and rate as they are now
	floats     int              // data area capacity for new workers
	channels   map[int]string
	errorsBase uint64 // exceptions and deaths of the workers that ended
	restarts   uint64
	lastExit   string
	down       string // why there is no worker, "" while one runs
	last       pyrt.StageStatus
	loaded     bool // a worker loaded the module at least once
}

// NewStage starts the stage's worker and loads its module. As with
// pyrt.Runtime.NewStage, a module that fails to import leaves a stage that
// passes data through until it is reloaded (the error says why); a missing
// file, or a worker that cannot start at all (no such interpreter), is an
// error and no stage.
func NewStage(cfg Config) (*Stage, error) {
	abs, err := filepath.Abs(cfg.Stage.Path)
	if err != nil {
		return nil, fmt.Errorf("python module %s: %w", cfg.Stage.Path, err)
	}
	if fi, err := os.Stat(abs); err != nil || fi.IsDir() {
		return nil, fmt.Errorf("python module %s: no such file", abs)
	}
	cfg.Stage.Path = abs
	if cfg.Stage.OnError == "" {
		cfg.Stage.OnError = pyrt.OnErrorContinue
	}
	if cfg.Stage.OnError != pyrt.OnErrorContinue && cfg.Stage.OnError != pyrt.OnErrorDisable {
		return nil, fmt.Errorf("python module %s: on_error %q: use \"continue\" or \"disable\"", abs, cfg.Stage.OnError)
	}
	if cfg.Command == nil {
		return nil, fmt.Errorf("python module %s: isolated stage without a worker command", abs)
	}
	if cfg.Stage.Name == "" {
		cfg.Stage.Name = strings.TrimSuffix(filepath.Base(abs), ".py")
	}
	if cfg.BlockTimeout == 0 {
		cfg.BlockTimeout = 2 * time.Second
	}
	if cfg.HookTimeout <= 0 {
		cfg.HookTimeout = 10 * time.Second
	}
	if d := blockDeadline(cfg.BlockTimeout); d > 0 {
		cfg.HookTimeout = max(cfg.HookTimeout, d)
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 60 * time.Second
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(10*time.Second, cfg.MinBackoff)
	}
	if cfg.StableAfter <= 0 {
		cfg.StableAfter = time.Minute
	}
	if cfg.BlockSamples <= 0 {
		cfg.BlockSamples = 1024
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	s := &Stage{
		cfg: cfg, name: cfg.Stage.Name,
		log:      cfg.Log.With(zap.String("stage", cfg.Stage.Name)),
		kick:     make(chan struct{}, 1),
		closing:  make(chan struct{}),
		stopped:  make(chan struct{}),
		stageCfg: cfg.Stage,
		floats:   max(1, cfg.Stage.Channels) * cfg.BlockSamples,
		channels: map[int]string{},
		down:     "starting",
	}
	w, loadErr, err := s.start()
	if err != nil {
		return nil, fmt.Errorf("python module %s: %w", abs, err)
	}
	s.running(w)
	go s.supervise(w)
	return s, loadErr
}

// running makes w the stage's worker.
func (s *Stage) running(w *worker) {
	s.mu.Lock()
	s.down = ""
	s.mu.Unlock()
	s.cur.Store(w)
}

// Name is the stage's display name.
func (s *Stage) Name() string { return s.name }

// ID is the stage's processor id.
func (s *Stage) ID() int { return s.cfg.Stage.ID }

// Path is the module file.
func (s *Stage) Path() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stageCfg.Path
}

// Retained is always false: scripts see the worker's shared memory, never
// the pipeline's blocks.
func (s *Stage) Retained() bool { return false }

// PID is the process id of the running worker, 0 while it is down.
func (s *Stage) PID() int {
	if w := s.cur.Load(); w != nil {
		return w.pid
	}
	return 0
}

// Restarts is the number of workers started after the first.
func (s *Stage) Restarts() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restarts
}

// blockDeadline is how long the parent waits for one block.
func (s *Stage) blockDeadline() time.Duration { return blockDeadline(s.cfg.BlockTimeout) }

// deadlineMargin is how much longer than pyrt.MaxStall the parent waits
// for a block: the worker's own watchdog gets to interrupt the call first.
const deadlineMargin = 250 * time.Millisecond

func blockDeadline(limit time.Duration) time.Duration {
	stall := pyrt.MaxStall(limit)
	if stall <= 0 {
		return 0 // never interrupted: only the worker's death ends the wait
	}
	return stall + deadlineMargin
}

// ---------------------------------------------------------------- the worker

// worker is one worker process and what the parent holds of it.
type worker struct {
	s       *Stage
	cmd     *exec.Cmd
	pid     int
	started time.Time

	// use is held by the stage thread during a request and by release:
	// the mapping and the descriptors are never freed under a request.
	use      sync.Mutex
	released bool
	m        *mapping
	memfd    *os.File
	req      *os.File
	done     *os.File
	reqFd    int
	doneFd   int
	pidfd    int
	pfds     [2]unix.PollFd
	seq      uint64
	ts       unix.Timespec
	one, buf [8]byte

	gone       atomic.Bool // dead, killed or released: no more requests
	killReason atomic.Pointer[string]
	exited     chan struct{} // closed when the process has been reaped
	waitErr    error

	ctl     *conn
	ready   chan *message
	pmu     sync.Mutex
	pending map[uint64]chan *message
	nextID  atomic.Uint64

	stderr *outputLog
}

var (
	errDied    = errors.New("the worker process died")
	errTimeout = errors.New("the worker did not answer in time")
)

// start starts a worker and waits until it has loaded the module. loadErr
// is the module's import error (the worker runs, passing data through);
// err means no worker.
func (s *Stage) start() (_ *worker, loadErr error, err error) {
	s.mu.Lock()
	sc := s.stageCfg
	floats := s.floats
	channels := make(map[int]string, len(s.channels))
	for k, v := range s.channels {
		channels[k] = v
	}
	s.mu.Unlock()

	w := &worker{s: s, exited: make(chan struct{}), ready: make(chan *message, 1), pending: map[uint64]chan *message{}, pidfd: -1}
	w.one[0] = 1
	var childFiles []*os.File
	fail := func(e error) (*worker, error, error) {
		for _, f := range childFiles {
			f.Close()
		}
		if w.cmd != nil && w.cmd.Process != nil {
			w.cmd.Process.Kill()
			<-w.exited
		}
		w.release()
		return nil, nil, e
	}
	memfd, size, err := newMemfd(s.name, floats)
	if err != nil {
		return fail(err)
	}
	w.memfd = memfd
	if w.m, err = mapShm(int(memfd.Fd()), size); err != nil {
		return fail(err)
	}
	w.m.hdr.magic, w.m.hdr.version = shmMagic, shmVersion
	w.m.hdr.mapSize = uint64(size)
	efd := func(name string) (*os.File, int, error) {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			return nil, -1, fmt.Errorf("eventfd: %w", err)
		}
		return os.NewFile(uintptr(fd), name), fd, nil
	}
	if w.req, w.reqFd, err = efd("request"); err != nil {
		return fail(err)
	}
	if w.done, w.doneFd, err = efd("done"); err != nil {
		return fail(err)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("socketpair: %w", err))
	}
	parentCtl := os.NewFile(uintptr(pair[0]), "control")
	childCtl := os.NewFile(uintptr(pair[1]), "control")
	childFiles = append(childFiles, childCtl)
	w.ctl, err = newConn(parentCtl)
	parentCtl.Close()
	if err != nil {
		return fail(err)
	}

	cmd, err := s.cfg.Command()
	if err != nil {
		return fail(err)
	}
	w.cmd = cmd
	cmd.ExtraFiles = []*os.File{memfd, w.req, w.done, childCtl} // fds 3, 4, 5, 6
	w.stderr = newOutputLog(s.log)
	cmd.Stdout, cmd.Stderr = w.stderr, w.stderr
	cmd.WaitDelay = time.Second
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.PidFD = &w.pidfd
	if err := cmd.Start(); err != nil {
		w.cmd = nil
		return fail(fmt.Errorf("starting the worker process %s: %w", cmd.Path, err))
	}
	childCtl.Close()
	childFiles = nil
	w.pid, w.started = cmd.Process.Pid, time.Now()
	go func() {
		w.waitErr = cmd.Wait()
		w.gone.Store(true)
		close(w.exited)
	}()
	if w.pidfd < 0 {
		// Without a pidfd from clone, open one (both need Linux ≥ 5.3).
		if w.pidfd, err = unix.PidfdOpen(w.pid, 0); err != nil {
			w.pidfd = -1
			return fail(fmt.Errorf("pidfd_open: %w", err))
		}
	}
	w.pfds = [2]unix.PollFd{{Fd: int32(w.doneFd), Events: unix.POLLIN}, {Fd: int32(w.pidfd), Events: unix.POLLIN}}
	go w.read()

	start := &startConfig{
		Stage: sc, Executable: s.cfg.Executable, Venv: s.cfg.Venv, SwitchInterval: s.cfg.SwitchInterval,
		BlockTimeout: s.cfg.BlockTimeout, ShmSize: size, Channels: channels,
	}
	if err := w.ctl.send(&message{Type: msgStart, Start: start}); err != nil {
		return fail(fmt.Errorf("sending the worker its configuration: %w", err))
	}
	timer := time.NewTimer(s.cfg.StartTimeout)
	defer timer.Stop()
	select {
	case m := <-w.ready:
		if m.Fatal != "" {
			return fail(errors.New(m.Fatal))
		}
		s.mu.Lock()
		if m.Load == nil && m.Err == "" {
			s.loaded = true
		}
		s.mu.Unlock()
		return w, m.err(), nil
	case <-w.exited:
		return fail(fmt.Errorf("the worker process ended while starting (%s)%s", w.exitText(), w.stderr.tailText()))
	case <-timer.C:
		return fail(fmt.Errorf("the worker process did not start Python and load the module within %s", s.cfg.StartTimeout))
	case <-s.closing:
		return fail(errors.New("the stage was closed"))
	}
}

// read serves the control socket's messages from the worker.
func (w *worker) read() {
	buf := make([]byte, maxPacket)
	for {
		m, err := w.ctl.receive(buf, time.Time{})
		if err != nil {
			return
		}
		switch m.Type {
		case msgLog:
			if _, ok := m.Fields["stage"]; !ok {
				if m.Fields == nil {
					m.Fields = map[string]any{}
				}
				m.Fields["stage"] = w.s.name
			}
			relog(w.s.cfg.Log, m, w.pid)
		case msgReady:
			select {
			case w.ready <- m:
			default:
			}
		case msgReply:
			w.pmu.Lock()
			ch := w.pending[m.ID]
			delete(w.pending, m.ID)
			w.pmu.Unlock()
			if ch != nil {
				ch <- m
			}
		}
	}
}

// request sends a control request and waits for its reply.
func (w *worker) request(m *message, timeout time.Duration) (*message, error) {
	m.ID = w.nextID.Add(1)
	ch := make(chan *message, 1)
	w.pmu.Lock()
	w.pending[m.ID] = ch
	w.pmu.Unlock()
	defer func() {
		w.pmu.Lock()
		delete(w.pending, m.ID)
		w.pmu.Unlock()
	}()
	if err := w.ctl.send(m); err != nil {
		return nil, ErrWorkerDown
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case r := <-ch:
		return r, nil
	case <-w.exited:
		return nil, ErrWorkerDown
	case <-timer.C:
		return nil, fmt.Errorf("the worker did not answer %s within %s", m.Type, timeout)
	}
}

// call posts a request in the shared memory and waits for the answer, the
// worker's death or the deadline (0: none). Stage thread, w.use held.
func (w *worker) call(kind uint32, deadline time.Duration) error {
	h := w.m.hdr
	h.kind = kind
	w.seq++
	h.reqSeq.Store(w.seq)
	for {
		_, err := unix.Write(w.reqFd, w.one[:])
		if err == nil {
			break
		}
		if err != unix.EINTR {
			return err
		}
	}
	var until time.Time
	if deadline > 0 {
		until = time.Now().Add(deadline)
	}
	for {
		var ts *unix.Timespec
		if deadline > 0 {
			left := time.Until(until)
			if left <= 0 {
				return errTimeout
			}
			w.ts = unix.NsecToTimespec(int64(left))
			ts = &w.ts
		}
		w.pfds[0].Revents, w.pfds[1].Revents = 0, 0
		_, err := unix.Ppoll(w.pfds[:], ts, nil)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return err
		}
		if w.pfds[0].Revents&unix.POLLIN != 0 {
			if _, err := unix.Read(w.doneFd, w.buf[:]); err != nil && err != unix.EINTR && err != unix.EAGAIN {
				return err
			}
			if h.respSeq.Load() == w.seq {
				return nil
			}
			continue
		}
		if w.pfds[1].Revents != 0 {
			return errDied
		}
	}
}

// kill ends a worker that does not answer.
func (w *worker) kill(reason string) {
	w.killReason.CompareAndSwap(nil, &reason)
	w.gone.Store(true)
	if w.pidfd >= 0 {
		unix.PidfdSendSignal(w.pidfd, unix.SIGKILL, nil, 0)
	} else if w.cmd != nil && w.cmd.Process != nil {
		w.cmd.Process.Kill()
	}
}

// release frees the mapping and the descriptors once no request uses
// them. The process must have exited (or never started).
func (w *worker) release() {
	w.use.Lock()
	defer w.use.Unlock()
	if w.released {
		return
	}
	w.released = true
	w.gone.Store(true)
	w.m.unmap()
	for _, f := range []*os.File{w.memfd, w.req, w.done} {
		if f != nil {
			f.Close()
		}
	}
	if w.pidfd >= 0 {
		unix.Close(w.pidfd)
		w.pidfd = -1
	}
	if w.ctl != nil {
		w.ctl.close()
	}
}

// exitText says how the process ended.
func (w *worker) exitText() string {
	if r := w.killReason.Load(); r != nil {
		return "killed by ephysd: " + *r
	}
	if w.cmd == nil || w.cmd.ProcessState == nil {
		if w.waitErr != nil {
			return w.waitErr.Error()
		}
		return "unknown"
	}
	ws, ok := w.cmd.ProcessState.Sys().(syscall.WaitStatus)
	switch {
	case !ok:
		return w.cmd.ProcessState.String()
	case ws.Signaled():
		t := "killed by signal " + unix.SignalName(ws.Signal())
		if ws.Signal() == syscall.SIGKILL {
			t += " (by a user, or by the kernel's out-of-memory killer)"
		}
		return t
	default:
		t := fmt.Sprintf("exited with status %d", ws.ExitStatus())
		if sig := w.stderr.fatalSignal(); sig != "" {
			t += " after a fatal " + sig
			if strings.HasPrefix(sig, "SIG") {
				t += " in native code"
			}
		}
		return t
	}
}

// ended makes an exit text ("killed by signal SIGKILL", "exited with
// status 3") follow "the worker".
func ended(how string) string {
	if strings.HasPrefix(how, "killed") {
		return "was " + how
	}
	return how
}

// ---------------------------------------------------------------- supervision

// supervise restarts the worker whenever it ends, until Close.
func (s *Stage) supervise(w *worker) {
	defer close(s.stopped)
	backoff := s.cfg.MinBackoff
	for {
		if w != nil {
			select {
			case <-w.exited:
			case <-s.closing:
				s.cur.Store(nil)
				w.shutdown()
				return
			}
			s.cur.Store(nil)
			ran := time.Since(w.started)
			if ran >= s.cfg.StableAfter {
				backoff = s.cfg.MinBackoff
			}
			s.died(w, ran, backoff)
			w.release()
		}
		timer := time.NewTimer(backoff)
		select {
		case <-timer.C:
		case <-s.kick:
			timer.Stop()
		case <-s.closing:
			timer.Stop()
			return
		}
		backoff = min(2*backoff, s.cfg.MaxBackoff)
		nw, loadErr, err := s.start()
		select {
		case <-s.closing:
			if nw != nil {
				nw.shutdown()
			}
			return
		default:
		}
		if err != nil {
			s.mu.Lock()
			s.down = "the worker could not be restarted: " + err.Error()
			s.errorsBase++
			s.mu.Unlock()
			s.log.Error("python worker could not be restarted; trying again", zap.Error(err), zap.Duration("retry_in", backoff))
			w = nil
			continue
		}
		w = nw
		s.mu.Lock()
		s.restarts++
		s.mu.Unlock()
		s.running(w)
		if loadErr != nil {
			s.log.Warn("python worker restarted, but its module does not load; the stage passes data through until it is reloaded",
				zap.Int("worker_pid", w.pid))
		} else {
			s.log.Info("python worker restarted", zap.Int("worker_pid", w.pid), zap.Uint64("restarts", s.Restarts()))
		}
	}
}

// died records and logs the end of a worker.
func (s *Stage) died(w *worker, ran, restartIn time.Duration) {
	how := w.exitText()
	var pyErrors uint64
	w.use.Lock()
	if w.m != nil && w.m.hdr != nil {
		pyErrors = w.m.hdr.pyErrors.Load()
	}
	w.use.Unlock()
	s.mu.Lock()
	s.errorsBase += pyErrors + 1
	s.lastExit = how
	s.down = "the worker " + ended(how)
	s.mu.Unlock()
	s.log.Error("python worker died; the stage passes data through unchanged until its worker is back, acquisition and recording go on",
		zap.Int("worker_pid", w.pid), zap.String("exit", how), zap.Duration("ran", ran.Round(time.Millisecond)),
		zap.Duration("restart_in", restartIn), zap.String("output", w.stderr.tailText()))
}

// shutdown ends a worker on Close: it exits when its control socket
// closes; one that does not within 2 s is killed.
func (w *worker) shutdown() {
	w.gone.Store(true)
	w.ctl.close()
	select {
	case <-w.exited:
	case <-time.After(2 * time.Second):
		w.kill("it did not exit when the stage was closed")
		<-w.exited
	}
	w.release()
}

// Close stops the worker; the stage passes data through afterwards.
func (s *Stage) Close() error {
	s.once.Do(func() { close(s.closing) })
	<-s.stopped
	return nil
}

// ---------------------------------------------------------------- stage thread

// worker returns the running worker, brought up to date with the
// acquisition and recording state first if it is new; nil while down.
func (s *Stage) worker() *worker {
	w := s.cur.Load()
	if w == nil || w.gone.Load() {
		return nil
	}
	if w != s.attached {
		s.attached = w
		if s.acquiring && !s.hook(w, hookStartAcquisition, "") {
			return nil
		}
		if s.recording != nil && !s.hook(w, hookStartRecording, s.recording.Dir) {
			return nil
		}
	}
	return w
}

// hook runs a hook in the worker; false if the worker is gone.
func (s *Stage) hook(w *worker, which uint32, arg string) bool {
	w.use.Lock()
	defer w.use.Unlock()
	if w.released || w.gone.Load() {
		return false
	}
	h := w.m.hdr
	h.hook = which
	h.argLen = uint32(copy(w.m.area(argOff, argSize), arg))
	if len(arg) > argSize {
		s.log.Error("start_recording: the recording folder's path is too long for an isolated stage; the script gets it cut",
			zap.Int("bytes", len(arg)), zap.Int("limit", argSize))
	}
	if err := w.call(kindHook, s.cfg.HookTimeout); err != nil {
		s.lost(w, err, hookNames[which])
		return false
	}
	return true
}

// lost handles a failed request: a timeout kills the worker; the
// supervisor logs the end and restarts it.
func (s *Stage) lost(w *worker, err error, in string) {
	w.gone.Store(true)
	if errors.Is(err, errTimeout) {
		limit := s.blockDeadline()
		if in != "process" {
			limit = s.cfg.HookTimeout
		}
		w.kill(fmt.Sprintf("no answer to %s within %s (stuck in native code?)", in, limit))
		return
	}
	if !errors.Is(err, errDied) {
		w.kill(fmt.Sprintf("%s failed: %v", in, err))
	}
}

// StartAcquisition implements pipeline.AcquisitionHooks.
func (s *Stage) StartAcquisition() error {
	w := s.worker()
	s.acquiring = true
	if w != nil {
		s.hook(w, hookStartAcquisition, "")
	}
	return nil
}

// StopAcquisition implements pipeline.AcquisitionHooks.
func (s *Stage) StopAcquisition() error {
	w := s.worker()
	if w != nil {
		s.hook(w, hookStopAcquisition, "")
	}
	s.acquiring = false
	return nil
}

// StartRecording implements pipeline.RecordingHooks.
func (s *Stage) StartRecording(r *pipeline.Recording) error {
	w := s.worker()
	s.recording = r
	if w != nil {
		s.hook(w, hookStartRecording, r.Dir)
	}
	return nil
}

// StopRecording implements pipeline.RecordingHooks.
func (s *Stage) StopRecording() error {
	w := s.worker()
	if w != nil {
		s.hook(w, hookStopRecording, "")
	}
	s.recording = nil
	return nil
}

// Process implements pipeline.Stage: the block's samples, TTL events and
// spikes go to the worker, which runs the handlers and process(data); its
// output samples and events come back. While the worker is down, and for
// the block it dies on, the block passes through unchanged.
func (s *Stage) Process(b *pipeline.Block) error {
	w := s.worker()
	if w == nil {
		return nil
	}
	w.use.Lock()
	defer w.use.Unlock()
	if w.released || w.gone.Load() {
		return nil
	}
	n := b.Channels * b.Samples
	if n > len(w.m.data) {
		if err := s.grow(w, n); err != nil {
			s.lost(w, err, "a resize of the shared memory")
			return nil
		}
	}
	h := w.m.hdr
	copy(w.m.data[:n], b.Data[:n])
	h.channels, h.samples, h.first = uint32(b.Channels), uint32(b.Samples), b.FirstSample

	id := s.cfg.Stage.ID
	var ew eventWriter
	ew.reset(w.m.area(evInOff, eventsSize))
	for i := range b.Events {
		if e := &b.Events[i]; e.Kind == pipeline.EventTTL && e.Processor != id {
			ew.add(e)
		}
	}
	h.evInN, h.evInBytes = uint32(ew.n), uint32(ew.used)
	var sw spikeWriter
	sw.reset(w.m.area(spInOff, spikesSize))
	for i := range b.Spikes {
		if sp := &b.Spikes[i]; len(sp.Waveform) > 0 {
			sw.add(sp)
		}
	}
	h.spInN, h.spInBytes = uint32(sw.n), uint32(sw.used)
	if ew.dropped+sw.dropped > 0 {
		if ok, more := s.inDropped.Allow(time.Now()); ok {
			s.log.Warn("a block has more events or spikes than an isolated stage's shared memory holds; the script does not see the rest",
				zap.Int64("first_sample", b.FirstSample), zap.Int("events_dropped", ew.dropped), zap.Int("spikes_dropped", sw.dropped),
				zap.Int("more_not_logged", more))
		}
	}

	if err := w.call(kindBlock, s.blockDeadline()); err != nil {
		s.lost(w, err, "process")
		return nil
	}
	if h.status != statusProcessed {
		return nil
	}
	copy(b.Data[:n], w.m.data[:n])
	s.takeOutput(w, b)
	return nil
}

// takeOutput appends the events and spikes the script made to the block.
func (s *Stage) takeOutput(w *worker, b *pipeline.Block) {
	h := w.m.hdr
	area := w.m.area(evOutOff, eventsSize)
	nEv := int(h.evOutN)
	if nEv*eventRecord > len(area) {
		nEv = 0
	}
	id := s.cfg.Stage.ID
	for i := 0; i < nEv; i++ {
		e := getEvent(area[i*eventRecord:])
		if e.Line < 64 {
			if e.State {
				s.word |= 1 << e.Line
			} else {
				s.word &^= 1 << e.Line
			}
		}
		b.Events = append(b.Events, pipeline.Event{
			Kind: pipeline.EventTTL, Processor: id, Line: e.Line, State: e.State,
			SampleNumber: e.SampleNumber, FullWord: s.word,
		})
	}
	if h.spOutN > 0 {
		var err error
		before := len(b.Spikes)
		b.Spikes, err = s.spikes.read(b.Spikes, w.m.area(spOutOff, min(int(h.spOutBytes), spikesSize)), int(h.spOutN))
		if err != nil {
			b.Spikes = b.Spikes[:before]
			s.log.Error("the spikes an isolated stage returned are malformed; they are dropped", zap.Error(err))
		}
	}
	if h.evOutDropped+h.spOutDropped > 0 {
		if ok, more := s.outDropped.Allow(time.Now()); ok {
			s.log.Warn("a script made more events or spikes in one block than an isolated stage's shared memory holds; the rest were dropped",
				zap.Int64("first_sample", b.FirstSample), zap.Uint32("events_dropped", h.evOutDropped),
				zap.Uint32("spikes_dropped", h.spOutDropped), zap.Int("more_not_logged", more))
		}
	}
}

// grow enlarges the shared data area to hold floats values (the first
// block of a larger shape). w.use held.
func (s *Stage) grow(w *worker, floats int) error {
	size := shmSize(floats)
	if err := w.memfd.Truncate(int64(size)); err != nil {
		return fmt.Errorf("growing the shared memory to %d bytes: %w", size, err)
	}
	m, err := mapShm(int(w.memfd.Fd()), size)
	if err != nil {
		return err
	}
	m.hdr.mapSize = uint64(size)
	old := w.m
	w.m = m
	err = w.call(kindRemap, s.cfg.HookTimeout)
	old.unmap()
	if err != nil {
		return err
	}
	if m.hdr.status != statusDone {
		return errors.New("the worker could not map the grown shared memory")
	}
	s.mu.Lock()
	s.floats = max(s.floats, floats)
	s.mu.Unlock()
	return nil
}

// ---------------------------------------------------------------- any goroutine

// RegisterEventChannel names the event channel of a processor, as passed
// to handle_ttl_event's channel argument (pyrt.Runtime.RegisterEventChannel
// for this stage's interpreter). Call it before the pipeline starts.
func (s *Stage) RegisterEventChannel(processorID int, name string) {
	s.mu.Lock()
	s.channels[processorID] = name
	s.mu.Unlock()
	if w := s.cur.Load(); w != nil && !w.gone.Load() {
		// Waited for, so that the blocks after it see the name. A worker
		// that is down gets it when it starts.
		w.request(&message{Type: msgChannel, Node: processorID, Name: name}, controlTimeout)
	}
}

// Status reports the stage's state, asking the worker for its part; while
// the worker is down the state is "failed" and LastError says why.
func (s *Stage) Status() pyrt.StageStatus {
	var st pyrt.StageStatus
	var got bool
	if w := s.cur.Load(); w != nil && !w.gone.Load() {
		if r, err := w.request(&message{Type: msgStatus}, time.Second); err == nil && r.Status != nil {
			st, got = *r.Status, true
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if got {
		s.last = st
	} else {
		st = s.last
		st.ID, st.Name, st.Path = s.cfg.Stage.ID, s.name, s.stageCfg.Path
		st.Errors = 0
		st.PassThrough = true
		switch {
		case s.down != "" && s.down != "starting":
			st.State = "failed"
			st.LastError = s.down + "; it is being restarted"
		case !s.loaded:
			st.State = "not loaded"
		default:
			st.State = "failed"
			st.LastError = "the worker does not answer"
		}
	}
	st.Errors += s.errorsBase
	if st.LastError == "" && s.lastExit != "" {
		st.LastError = "the last worker " + ended(s.lastExit)
	}
	st.Retained = false
	pid := 0
	if w := s.cur.Load(); w != nil && !w.gone.Load() {
		pid = w.pid
	}
	st.Worker = &pyrt.WorkerStatus{PID: pid, Restarts: s.restarts, LastExit: s.lastExit}
	return st
}

// controlTimeout bounds reload, set_module and reshape: an import may take
// long, but not forever.
const controlTimeout = 2 * time.Minute

func (s *Stage) control(m *message) error {
	w := s.cur.Load()
	if w == nil || w.gone.Load() {
		return ErrWorkerDown
	}
	r, err := w.request(m, controlTimeout)
	if err != nil {
		return err
	}
	return r.err()
}

// Reload re-imports the module in the worker while the pipeline may run:
// as pyrt.Stage.Reload, the import happens beside the blocks and the
// switch between two of them. If the new version fails to load, the old one
// keeps running and the error (a *pyrt.LoadError) is returned. While the
// worker is down, Reload restarts it at once (a new worker imports the
// module anew).
func (s *Stage) Reload() error {
	err := s.control(&message{Type: msgReload})
	if errors.Is(err, ErrWorkerDown) {
		s.restartNow()
		return nil
	}
	if err == nil {
		s.mu.Lock()
		s.loaded = true
		s.mu.Unlock()
	}
	return err
}

// restartNow cuts the wait before the next restart.
func (s *Stage) restartNow() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// SetModule points the stage at another module file and loads it. On
// failure the previous module keeps running.
func (s *Stage) SetModule(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(abs); err != nil || fi.IsDir() {
		return fmt.Errorf("python module %s: no such file", abs)
	}
	err = s.control(&message{Type: msgSetModule, Path: abs})
	if err == nil || errors.Is(err, ErrWorkerDown) {
		s.mu.Lock()
		s.stageCfg.Path = abs
		s.mu.Unlock()
	}
	if errors.Is(err, ErrWorkerDown) {
		s.restartNow()
		return nil
	}
	return err
}

// Reshape gives the stage a stream of another channel count or rate (a new
// instance, as in Open Ephys). Not while a pipeline runs the stage.
func (s *Stage) Reshape(channels int, rate float64) error {
	s.mu.Lock()
	same := channels == s.stageCfg.Channels && rate == s.stageCfg.SampleRate
	s.stageCfg.Channels, s.stageCfg.SampleRate = channels, rate
	s.mu.Unlock()
	if same {
		return nil
	}
	err := s.control(&message{Type: msgReshape, Channels: channels, Rate: rate})
	if errors.Is(err, ErrWorkerDown) {
		return nil // the next worker starts with the new shape
	}
	return err
}

// SameModule reports whether cfg describes this stage: same id, module
// file, name and error policy (the stream's shape aside).
func (s *Stage) SameModule(cfg pyrt.StageConfig) bool {
	abs, err := filepath.Abs(cfg.Path)
	if err != nil {
		return false
	}
	name := cfg.Name
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(abs), ".py")
	}
	onErr := cfg.OnError
	if onErr == "" {
		onErr = pyrt.OnErrorContinue
	}
	return cfg.ID == s.cfg.Stage.ID && abs == s.Path() && name == s.name && onErr == s.cfg.Stage.OnError
}

// ---------------------------------------------------------------- worker output

// outputLog logs what a worker writes to its stdout and stderr (Python's
// own output goes through the control socket; this is what bypasses it: a
// fatal error of the Go runtime or of CPython), and keeps the last lines
// for the report of the worker's death.
type outputLog struct {
	log *zap.Logger

	mu      sync.Mutex
	partial []byte
	tail    []string
	logged  int
	skipped int
	fatal   string // the cause in a crash report, once seen
}

const (
	outputTail   = 12
	outputLogged = 400 // lines logged per worker; the rest are counted
)

func newOutputLog(log *zap.Logger) *outputLog { return &outputLog{log: log} }

func (o *outputLog) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.partial = append(o.partial, p...)
	for {
		i := bytes.IndexByte(o.partial, '\n')
		if i < 0 {
			break
		}
		o.line(string(o.partial[:i]))
		o.partial = o.partial[i+1:]
	}
	o.partial = append([]byte(nil), o.partial...)
	if len(o.partial) > 64<<10 {
		o.line(string(o.partial))
		o.partial = o.partial[:0]
	}
	return len(p), nil
}

func (o *outputLog) line(l string) {
	if o.fatal == "" {
		o.fatal = crashCause(l)
	}
	if len(o.tail) == outputTail {
		copy(o.tail, o.tail[1:])
		o.tail = o.tail[:outputTail-1]
	}
	o.tail = append(o.tail, l)
	if o.logged < outputLogged {
		o.logged++
		o.log.Warn("python worker output", zap.String("line", l))
	} else {
		o.skipped++
	}
}

// tailText is the last lines, for error messages ("" if none).
func (o *outputLog) tailText() string {
	if o == nil {
		return ""
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	lines := o.tail
	if len(o.partial) > 0 {
		lines = append(append([]string(nil), lines...), string(o.partial))
	}
	if len(lines) == 0 {
		return ""
	}
	return ": " + strings.Join(lines, " | ")
}

// fatalSignal is what crashed the worker, from the crash report of the Go
// runtime ("SIGSEGV: segmentation violation", "[signal SIGSEGV: …]",
// "fatal error: …") or of CPython ("Fatal Python error: …"); "" if none.
func (o *outputLog) fatalSignal() string {
	if o == nil {
		return ""
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.fatal
}

// crashCause recognises the first line of a crash report.
func crashCause(l string) string {
	if i := strings.Index(l, "[signal SIG"); i >= 0 {
		l = l[i+len("[signal "):]
	}
	if strings.HasPrefix(l, "SIG") {
		if i := strings.IndexByte(l, ':'); i > 3 && !strings.ContainsRune(l[:i], ' ') {
			return l[:i]
		}
	}
	if strings.HasPrefix(l, "fatal error: ") {
		return "Go runtime error (" + strings.TrimPrefix(l, "fatal error: ") + ")"
	}
	if strings.HasPrefix(l, "Fatal Python error: ") {
		return "Python error (" + strings.TrimPrefix(l, "Fatal Python error: ") + ")"
	}
	return ""
}
