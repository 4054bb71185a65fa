package isolated

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
)

// WorkerRole is the hidden subcommand of the ephysd binary that runs
// WorkerMain (`ephysd stage-worker`). Users never run it.
const WorkerRole = "stage-worker"

// The file descriptors a worker inherits (exec.Cmd.ExtraFiles, in order).
const (
	fdShm  = 3 // the memfd
	fdReq  = 4 // eventfd: the parent posted a request
	fdDone = 5 // eventfd: the worker answered
	fdCtl  = 6 // the control socket
)

// WorkerMain is the worker process of an isolated stage: it reads its
// configuration from the control socket, starts the embedded interpreter,
// loads the module and serves requests until the parent closes the control
// socket (or dies). stderr gets what cannot go to the parent. It returns
// the process's exit code.
func WorkerMain(stderr io.Writer) int {
	f := os.NewFile(fdCtl, "control")
	if f == nil {
		fmt.Fprintln(stderr, "ephysd stage-worker: started without its control socket (fd 6); ephysd starts this command itself")
		return 2
	}
	c, err := newConn(f)
	f.Close()
	if err != nil {
		fmt.Fprintf(stderr, "ephysd stage-worker: control socket: %v (ephysd starts this command itself)\n", err)
		return 2
	}
	buf := make([]byte, maxPacket)
	m, err := c.receive(buf, time.Now().Add(30*time.Second))
	if err != nil || m.Type != msgStart || m.Start == nil {
		fmt.Fprintf(stderr, "ephysd stage-worker: no start message from ephysd: %v\n", err)
		return 2
	}
	cfg := m.Start
	log := zap.New(&logCore{c: c, level: zapcore.DebugLevel})
	fatal := func(err error) int {
		c.send(&message{Type: msgReady, Fatal: err.Error()})
		return 1
	}

	rt, err := pyrt.Start(pyrt.Config{
		Executable: cfg.Executable, Venv: cfg.Venv, SwitchInterval: cfg.SwitchInterval,
		BlockTimeout: cfg.BlockTimeout, Log: log,
	})
	if err != nil {
		return fatal(err)
	}
	for id, name := range cfg.Channels {
		rt.RegisterEventChannel(id, name)
	}
	mp, err := mapShm(fdShm, cfg.ShmSize)
	if err != nil {
		return fatal(err)
	}
	if mp.hdr.magic != shmMagic || mp.hdr.version != shmVersion {
		return fatal(fmt.Errorf("shared memory has magic %#x version %d, want %#x version %d", mp.hdr.magic, mp.hdr.version, shmMagic, shmVersion))
	}
	st, loadErr := rt.NewStage(cfg.Stage)
	if st == nil {
		return fatal(loadErr)
	}
	ready := &message{Type: msgReady, Version: rt.Interpreter().Version + " numpy " + rt.NumpyVersion()}
	if loadErr != nil {
		var le *pyrt.LoadError
		if errors.As(loadErr, &le) {
			ready.Load = le
		} else {
			ready.Err = loadErr.Error()
		}
	}
	w := &workerSide{c: c, rt: rt, st: st, m: mp, log: log}
	if err := c.send(ready); err != nil {
		return 1
	}
	rt.Execute(w.loop)
	w.control(buf) // returns when the parent is gone
	return 0
}

// workerSide is the worker's state.
type workerSide struct {
	c   *conn
	rt  *pyrt.Runtime
	st  *pyrt.Stage
	log *zap.Logger
	ops sync.Mutex // reload, set_module, reshape one at a time

	// Interpreter thread only.
	m      *mapping
	block  pipeline.Block
	spikes spikeReader
}

// control serves the control socket until it closes.
func (w *workerSide) control(buf []byte) {
	for {
		m, err := w.c.receive(buf, time.Time{})
		if err != nil {
			return
		}
		switch m.Type {
		case msgStatus:
			st := w.st.Status()
			w.c.send(&message{Type: msgReply, ID: m.ID, Status: &st})
		case msgChannel:
			w.rt.RegisterEventChannel(m.Node, m.Name)
			w.c.send(&message{Type: msgReply, ID: m.ID})
		case msgReload, msgSetModule, msgReshape:
			go func() {
				w.ops.Lock()
				defer w.ops.Unlock()
				var err error
				switch m.Type {
				case msgReload:
					err = w.st.Reload()
				case msgSetModule:
					err = w.st.SetModule(m.Path)
				case msgReshape:
					err = w.st.Reshape(m.Channels, m.Rate)
				}
				r := &message{Type: msgReply, ID: m.ID}
				var le *pyrt.LoadError
				if errors.As(err, &le) {
					r.Load = le
				} else if err != nil {
					r.Err = err.Error()
				}
				w.c.send(r)
			}()
		default:
			w.log.Warn("stage worker: unknown control message", zap.String("type", m.Type))
		}
	}
}

// loop runs on the interpreter thread: it waits for the parent's
// requests, and runs the runtime's other work (a reload's switch to the
// new instance) between them.
func (w *workerSide) loop(tasks <-chan func()) {
	pending := make(chan func(), 16)
	go func() {
		one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
		for f := range tasks {
			pending <- f
			unix.Write(fdReq, one) // wake the loop
		}
	}()
	var buf [8]byte
	one := [8]byte{1}
	var last uint64
	for {
		if _, err := unix.Read(fdReq, buf[:]); err != nil {
			if err == unix.EINTR || err == unix.EAGAIN {
				continue
			}
			w.log.Error("stage worker: reading its request eventfd failed; exiting", zap.Error(err))
			os.Exit(1)
		}
	drain:
		for {
			select {
			case f := <-pending:
				f()
			default:
				break drain
			}
		}
		seq := w.m.hdr.reqSeq.Load()
		if seq == last {
			continue
		}
		last = seq
		w.serve()
		w.m.hdr.respSeq.Store(seq)
		for {
			if _, err := unix.Write(fdDone, one[:]); err != unix.EINTR {
				break
			}
		}
	}
}

// serve answers the request in the header.
func (w *workerSide) serve() {
	h := w.m.hdr
	switch h.kind {
	case kindBlock:
		h.status = w.process()
	case kindHook:
		switch h.hook {
		case hookStartAcquisition:
			w.st.StartAcquisition()
		case hookStopAcquisition:
			w.st.StopAcquisition()
		case hookStartRecording:
			n := min(int(h.argLen), argSize)
			dir := string(w.m.area(argOff, argSize)[:n])
			w.st.StartRecording(&pipeline.Recording{Dir: dir})
		case hookStopRecording:
			w.st.StopRecording()
		}
		h.status = statusDone
	case kindRemap:
		m, err := mapShm(fdShm, int(h.mapSize))
		if err != nil {
			w.log.Error("stage worker: cannot map the grown shared memory", zap.Error(err))
			h.status = statusBadRequest
			return
		}
		old := w.m
		w.m = m
		if !w.st.Retained() {
			// A script holding a view of the old data area keeps the old
			// mapping alive (it is never unmapped then).
			old.unmap()
		}
		h = w.m.hdr
		h.status = statusDone
	default:
		h.status = statusBadRequest
	}
	h.pyErrors.Store(w.st.Status().Errors)
}

// process runs the stage on the block in the shared memory.
func (w *workerSide) process() uint32 {
	h := w.m.hdr
	ch, n := int(h.channels), int(h.samples)
	if ch < 1 || n < 1 || ch*n > len(w.m.data) || int(h.evInBytes) > eventsSize || int(h.spInBytes) > spikesSize {
		w.log.Error("stage worker: a block does not fit the shared memory; it passes through",
			zap.Int("channels", ch), zap.Int("samples", n), zap.Int("capacity", len(w.m.data)))
		return statusBadRequest
	}
	b := &w.block
	b.Channels, b.Samples, b.FirstSample = ch, n, h.first
	b.Data = w.m.data[:ch*n]
	var err error
	b.Events, err = readEvents(b.Events[:0], w.m.area(evInOff, int(h.evInBytes)), int(h.evInN))
	if err == nil {
		b.Spikes, err = w.spikes.read(b.Spikes[:0], w.m.area(spInOff, int(h.spInBytes)), int(h.spInN))
	}
	if err != nil {
		w.log.Error("stage worker: a block's events are malformed; it passes through", zap.Error(err))
		return statusBadRequest
	}
	nEv, nSp := len(b.Events), len(b.Spikes)
	state := w.st.Status().State
	w.st.Process(b)

	var ew eventWriter
	ew.reset(w.m.area(evOutOff, eventsSize))
	for i := nEv; i < len(b.Events); i++ {
		ew.add(&b.Events[i])
	}
	h.evOutN, h.evOutBytes, h.evOutDropped = uint32(ew.n), uint32(ew.used), uint32(ew.dropped)
	var sw spikeWriter
	sw.reset(w.m.area(spOutOff, spikesSize))
	for i := nSp; i < len(b.Spikes); i++ {
		sw.add(&b.Spikes[i])
	}
	h.spOutN, h.spOutBytes, h.spOutDropped = uint32(sw.n), uint32(sw.used), uint32(sw.dropped)
	h.retained = 0
	if w.st.Retained() {
		h.retained = 1
	}
	if state != "running" && state != "failed" {
		return statusPassThrough
	}
	return statusProcessed
}
