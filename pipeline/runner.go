package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// RunnerConfig wires a runner. Source and Pool are required.
type RunnerConfig struct {
	Source   Reader
	SourceID int // processor id given to the source's TTL events
	Pool     *Pool
	Stages   []Stage
	// EventSinks see each block's events on the stage thread right after the
	// last stage (closed-loop outputs).
	EventSinks []EventSink
	// Consumers receive every processed block, in order, on one goroutine.
	Consumers []Consumer
	// KeepRaw gives each block a copy of its pre-stage samples in Block.Raw.
	KeepRaw bool
	// QueueDepth is the number of blocks each queue holds (default 64).
	QueueDepth int
	// StageQueueDepth, if larger, is the depth of the queue before the
	// stages: room for the blocks a live source delivers while a stage is
	// stuck in one call until it is interrupted (pyrt.MaxStall).
	StageQueueDepth int
	// Backpressure makes the source wait for the stages instead of dropping
	// blocks: right for offline processing, wrong for a live device.
	Backpressure bool
	// Inline reads the source on the stage thread and processes each block
	// at once, without a queue in between: the lowest latency (closed
	// loop). A stage that falls behind then delays reading, and what the
	// device loses meanwhile shows as gaps, not overruns.
	Inline bool
	// Executor runs the stage loop (default: a goroutine).
	Executor Executor
	// Interrupt, if set, is called by Stop to unblock a source that is
	// waiting for its device.
	Interrupt func()
	// ThreadSetup, if set, is called on the OS threads of the source loop
	// ("source") and of the stage loop ("stages"), locked to their
	// goroutines, before they handle blocks: realtime priority, CPU
	// affinity. The function it returns undoes that when the loop ends.
	ThreadSetup func(role string) (restore func())
	Log         *zap.Logger
}

// Stats are the runner's counters.
type Stats struct {
	Blocks         uint64 // blocks read from the source
	Samples        uint64 // samples read from the source
	Processed      uint64 // blocks that went through the stages
	OverrunBlocks  uint64 // blocks dropped because the stages were behind
	OverrunSamples uint64
	Gaps           uint64 // sample-number jumps reported by the source
	GapSamples     uint64
	Events         uint64 // events in processed blocks
	StageErrors    []uint64
}

// Runner moves blocks source → stages → consumers, each on its own
// goroutine, with bounded queues between them.
type Runner struct {
	cfg RunnerConfig
	log *zap.Logger

	stageQ chan *Block
	consQ  chan *Block
	ctl    chan func()
	spare  *Block

	ready     chan error
	readyOnce sync.Once
	// The stage loop's state, kept here rather than on the loop's stack so
	// that a loop can take over from one whose thread the executor gave up
	// (AbandonableExecutor). stageGen is bumped then: the abandoned loop
	// leaves the run to its successor as soon as (if ever) it gets control
	// back. The fields below stageMu are the loop's, guarded for the
	// moment of the takeover.
	stageGen     atomic.Uint64
	stageMu      sync.Mutex
	inStage      *Block     // the block the stages are working on
	current      *Recording // the recording the stages were told about
	hooksStarted int        // stages whose StartAcquisition has been called
	hooksStopped int
	blocksDone   bool      // the block loop has ended
	inlineRead   readState // the inline loop's reading state

	recording atomic.Pointer[Recording]
	msgMu     sync.Mutex
	messages  []string
	hasMsg    atomic.Bool
	stopping  atomic.Bool
	started   bool
	loopDone  chan struct{}
	done      chan struct{}

	errMu sync.Mutex
	err   error

	blocks, samples, processed    atomic.Uint64
	overrunBlocks, overrunSamples atomic.Uint64
	gaps, gapSamples, events      atomic.Uint64
	stageErrors                   []atomic.Uint64
	stageTimes                    []Histogram
	loopTime                      Histogram
	latency                       Histogram    // source read → event sinks done
	lastBlock                     atomic.Int64 // unix ns when a block last reached the consumers
	overrunLog, gapLog            LogLimiter
	stageErrLog                   []LogLimiter
	consumerFailed                atomic.Bool
}

// NewRunner checks the configuration and makes a runner.
func NewRunner(cfg RunnerConfig) (*Runner, error) {
	if cfg.Source == nil || cfg.Pool == nil {
		return nil, errors.New("pipeline: runner needs a source and a pool")
	}
	if cfg.QueueDepth <= 0 {
		cfg.QueueDepth = 64
	}
	if cfg.Executor == nil {
		cfg.Executor = goExecutor{}
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.StageQueueDepth < cfg.QueueDepth {
		cfg.StageQueueDepth = cfg.QueueDepth
	}
	r := &Runner{
		cfg:         cfg,
		log:         cfg.Log,
		stageQ:      make(chan *Block, cfg.StageQueueDepth),
		consQ:       make(chan *Block, cfg.QueueDepth),
		ctl:         make(chan func()),
		loopDone:    make(chan struct{}),
		done:        make(chan struct{}),
		stageErrors: make([]atomic.Uint64, len(cfg.Stages)),
		stageTimes:  make([]Histogram, len(cfg.Stages)),
		stageErrLog: make([]LogLimiter, len(cfg.Stages)),
	}
	r.spare = &Block{
		Channels: cfg.Pool.channels,
		Samples:  cfg.Pool.samples,
		Data:     make([]float32, cfg.Pool.channels*cfg.Pool.samples),
		Digital:  make([]uint64, cfg.Pool.samples),
		Events:   make([]Event, 0, DefaultEventCapacity),
		cap:      cfg.Pool.samples,
	}
	return r, nil
}

// PoolSizeFor is the number of pooled blocks a runner with this queue depth
// needs so that the source never waits for a block in steady state.
func PoolSizeFor(queueDepth int, keepRaw bool) int {
	if queueDepth <= 0 {
		queueDepth = 64
	}
	n := 2*queueDepth + 4
	if keepRaw {
		n *= 2
	}
	return n
}

// Start runs the acquisition hooks of the stages on the stage thread, then
// starts reading. It returns the first hook error without starting.
func (r *Runner) Start() error {
	if r.started {
		return errors.New("pipeline: runner already started")
	}
	r.started = true
	ready := make(chan error, 1)
	r.ready = ready
	loop := func(tasks <-chan func()) { r.stageLoop(tasks, 0) }
	if ae, ok := r.cfg.Executor.(AbandonableExecutor); ok {
		ae.ExecuteAbandonable(loop, r.abandonStageThread)
	} else {
		r.cfg.Executor.Execute(loop)
	}
	if err := <-ready; err != nil {
		close(r.stageQ)
		<-r.loopDone
		close(r.done)
		return err
	}
	go r.consumeLoop()
	if !r.cfg.Inline {
		go r.sourceLoop()
	}
	return nil
}

// StartRecording marks every block read from now on as part of rec.
func (r *Runner) StartRecording(rec *Recording) { r.recording.Store(rec) }

// Message attaches a text message (Open Ephys MessageCenter) to the next
// block read, stamped with that block's first sample number.
func (r *Runner) Message(text string) {
	r.msgMu.Lock()
	r.messages = append(r.messages, text)
	r.hasMsg.Store(true)
	r.msgMu.Unlock()
}

// StopRecording marks blocks read from now on as not recorded.
func (r *Runner) StopRecording() { r.recording.Store(nil) }

// Stop ends reading; blocks already read still go through the stages and to
// the consumers. Wait for the end with Wait.
func (r *Runner) Stop() {
	if r.stopping.Swap(true) {
		return
	}
	if r.cfg.Interrupt != nil {
		r.cfg.Interrupt()
	}
}

// Wait waits until the last block has been consumed and returns the first
// error that ended the run (a source or consumer failure), or nil.
func (r *Runner) Wait() error {
	<-r.done
	r.errMu.Lock()
	defer r.errMu.Unlock()
	return r.err
}

// Done is closed when the run has ended.
func (r *Runner) Done() <-chan struct{} { return r.done }

// Do runs fn on the stage thread between two blocks and waits for it.
func (r *Runner) Do(fn func()) error {
	finished := make(chan struct{})
	select {
	case r.ctl <- func() { fn(); close(finished) }:
		<-finished
		return nil
	case <-r.loopDone:
		return errors.New("pipeline: the stage loop is not running")
	}
}

// Stats returns a snapshot of the counters.
func (r *Runner) Stats() Stats {
	s := Stats{
		Blocks:         r.blocks.Load(),
		Samples:        r.samples.Load(),
		Processed:      r.processed.Load(),
		OverrunBlocks:  r.overrunBlocks.Load(),
		OverrunSamples: r.overrunSamples.Load(),
		Gaps:           r.gaps.Load(),
		GapSamples:     r.gapSamples.Load(),
		Events:         r.events.Load(),
		StageErrors:    make([]uint64, len(r.stageErrors)),
	}
	for i := range r.stageErrors {
		s.StageErrors[i] = r.stageErrors[i].Load()
	}
	return s
}

// StageTime is the histogram of stage i's time per block.
func (r *Runner) StageTime(i int) *Histogram { return &r.stageTimes[i] }

// LoopTime is the histogram of the time all stages together took per block.
func (r *Runner) LoopTime() *Histogram { return &r.loopTime }

// Latency is the histogram of the time from the source delivering a block
// to its events having reached the event sinks (the closed-loop latency
// inside ephysd).
func (r *Runner) Latency() *Histogram { return &r.latency }

// LastBlock is when a block last reached the consumers (the pipeline's
// heartbeat); zero before the first.
func (r *Runner) LastBlock() time.Time {
	ns := r.lastBlock.Load()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// QueueDepths returns how many blocks wait before the stages and before
// the consumers.
func (r *Runner) QueueDepths() (stages, consumers int) { return len(r.stageQ), len(r.consQ) }

func (r *Runner) fail(err error) {
	r.errMu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.errMu.Unlock()
	r.Stop()
}

// readState is what reading carries from one block to the next.
type readState struct {
	prevWord uint64
	next     int64
	haveNext bool
}

// read fills b from the source and prepares it: checks, counters, gaps,
// TTL edges, recording, messages. A non-nil error ends reading (io.EOF at
// the end of the source).
func (r *Runner) read(st *readState, b *Block) error {
	if err := r.cfg.Source.ReadBlock(b); err != nil {
		if errors.Is(err, io.EOF) || r.stopping.Load() {
			return io.EOF
		}
		return fmt.Errorf("source: %w", err)
	}
	if b.Samples < 1 || b.Samples > b.cap || b.Channels != r.cfg.Pool.channels {
		return fmt.Errorf("source: block of %d channels × %d samples does not fit the pool's %d × 1..%d", b.Channels, b.Samples, r.cfg.Pool.channels, b.cap)
	}
	b.ReadAt = time.Now()
	n := uint64(b.Samples)
	r.blocks.Add(1)
	r.samples.Add(n)
	if st.haveNext && b.FirstSample != st.next {
		r.gaps.Add(1)
		if b.FirstSample > st.next {
			r.gapSamples.Add(uint64(b.FirstSample - st.next))
		}
		if ok, more := r.gapLog.Allow(time.Now()); ok {
			r.log.Warn("source gap: samples were lost before reaching ephysd",
				zap.Int64("expected_sample", st.next), zap.Int64("got_sample", b.FirstSample),
				zap.Int64("missing", b.FirstSample-st.next), zap.Int("more_gaps_not_logged", more))
		}
	}
	st.next, st.haveNext = b.FirstSample+int64(b.Samples), true
	b.Events, st.prevWord = AppendEdges(b.Events, r.cfg.SourceID, st.prevWord, b.Digital[:b.Samples], b.FirstSample)
	b.Recording = r.recording.Load()
	if r.hasMsg.Load() && b != r.spare {
		r.msgMu.Lock()
		for _, m := range r.messages {
			b.Events = append(b.Events, Event{Kind: EventMessage, Processor: MessageCenterID, SampleNumber: b.FirstSample, Text: m})
		}
		r.messages = r.messages[:0]
		r.hasMsg.Store(false)
		r.msgMu.Unlock()
	}
	return nil
}

func (r *Runner) sourceLoop() {
	defer close(r.stageQ)
	if r.cfg.ThreadSetup != nil {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer r.cfg.ThreadSetup("source")()
	}
	var st readState
	ctx := context.Background()
	for !r.stopping.Load() {
		var b *Block
		if r.cfg.Backpressure {
			b, _ = r.cfg.Pool.Get(ctx)
		} else if b = r.cfg.Pool.TryGet(); b == nil {
			b = r.spare
			b.Reset()
		}
		if err := r.read(&st, b); err != nil {
			if b != r.spare {
				b.Release()
			}
			if err != io.EOF {
				r.fail(err)
			}
			return
		}
		if b == r.spare {
			r.overrun(b)
			continue
		}
		if r.cfg.Backpressure {
			r.stageQ <- b
			continue
		}
		select {
		case r.stageQ <- b:
		default:
			r.overrun(b)
			b.Release()
		}
	}
}

func (r *Runner) overrun(b *Block) {
	r.overrunBlocks.Add(1)
	r.overrunSamples.Add(uint64(b.Samples))
	if ok, more := r.overrunLog.Allow(time.Now()); ok {
		r.log.Warn("overrun: processing is behind the source, block dropped (a gap in sample numbers)",
			zap.Int64("first_sample", b.FirstSample), zap.Int("samples", b.Samples),
			zap.Uint64("overruns_total", r.overrunBlocks.Load()), zap.Int("more_not_logged", more))
	}
}

// AbandonableExecutor is an Executor whose thread can get stuck for good
// inside a stage (Python blocked in C code that ignores interruption).
// ExecuteAbandonable runs loop as Execute does; if the executor gives up
// its thread while loop runs there, it calls abandon once, from another
// goroutine, and lets the stuck stage call return (if it ever does) only
// after abandon has returned.
type AbandonableExecutor interface {
	Executor
	ExecuteAbandonable(loop func(tasks <-chan func()), abandon func())
}

// abandonStageThread continues the stage loop on a new goroutine when the
// executor gave up its thread. The block the stuck stage holds is lost: it
// is counted as an overrun (a gap in the recorded sample numbers) and never
// reused, since the stuck code may still write to it.
func (r *Runner) abandonStageThread() {
	r.stageMu.Lock()
	gen := r.stageGen.Add(1)
	b := r.inStage
	r.inStage = nil
	r.stageMu.Unlock()
	if b != nil {
		r.overrunBlocks.Add(1)
		r.overrunSamples.Add(uint64(b.Samples))
		r.log.Error("the stage thread is stuck for good in a stage: the block it holds is dropped (a gap in sample numbers), and the stages go on from another thread",
			zap.Int64("first_sample", b.FirstSample), zap.Int("samples", b.Samples))
	} else {
		r.log.Error("the stage thread is stuck for good in a stage hook or task: the stages go on from another thread")
	}
	go r.stageLoop(nil, gen)
}

// live reports whether the loop of generation gen still runs the stages.
func (r *Runner) live(gen uint64) bool { return r.stageGen.Load() == gen }

// nextHook claims the next stage whose hook the counter counts; -1 when
// all have had it, ok false when the loop was replaced.
func (r *Runner) nextHook(counter *int, gen uint64) (i int, ok bool) {
	r.stageMu.Lock()
	defer r.stageMu.Unlock()
	if !r.live(gen) {
		return -1, false
	}
	if *counter >= len(r.cfg.Stages) {
		return -1, true
	}
	*counter++
	return *counter - 1, true
}

// stageLoop runs the stages' start hooks, the blocks, and the stop hooks.
// gen is the loop's generation; a loop replaced by abandonStageThread
// returns as soon as it gets control back, and its successor carries on
// from where it was.
func (r *Runner) stageLoop(tasks <-chan func(), gen uint64) {
	if r.cfg.ThreadSetup != nil {
		// On the interpreter's thread, which stays locked, this only nests.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer r.cfg.ThreadSetup("stages")()
	}
	for {
		i, ok := r.nextHook(&r.hooksStarted, gen)
		if !ok {
			return
		}
		if i < 0 {
			break
		}
		s := r.cfg.Stages[i]
		if h, ok := s.(AcquisitionHooks); ok {
			if err := h.StartAcquisition(); err != nil {
				r.log.Error("stage start_acquisition failed", zap.String("stage", s.Name()), zap.Error(err))
			}
		}
	}
	r.readyOnce.Do(func() { r.ready <- nil })
	r.stageMu.Lock()
	done := r.blocksDone
	r.stageMu.Unlock()
	if !done {
		var ok bool
		if r.cfg.Inline {
			ok = r.inlineLoop(tasks, gen)
		} else {
			ok = r.queuedLoop(tasks, gen)
		}
		if !ok {
			return
		}
		r.stageMu.Lock()
		r.blocksDone = true
		r.stageMu.Unlock()
	}
	if !r.recordingTo(nil, gen) {
		return
	}
	for {
		i, ok := r.nextHook(&r.hooksStopped, gen)
		if !ok {
			return
		}
		if i < 0 {
			break
		}
		s := r.cfg.Stages[i]
		if h, ok := s.(AcquisitionHooks); ok {
			if err := h.StopAcquisition(); err != nil {
				r.log.Error("stage stop_acquisition failed", zap.String("stage", s.Name()), zap.Error(err))
			}
		}
	}
	if !r.live(gen) {
		return
	}
	close(r.consQ)
	close(r.loopDone)
}

// queuedLoop processes the blocks the source loop queues, and the thread's
// other work between them, until the source loop ends (true) or the loop
// is replaced (false).
func (r *Runner) queuedLoop(tasks <-chan func(), gen uint64) bool {
	for {
		select {
		case b, ok := <-r.stageQ:
			if !ok {
				return true
			}
			if !r.process(b, gen) {
				return false
			}
		case f := <-r.ctl:
			f()
		case f := <-tasks:
			f()
		}
		if !r.live(gen) {
			return false
		}
	}
}

// inlineLoop reads the source on this thread and processes each block at
// once: one thread hand-off less per block (closed loop). A stage that
// falls behind delays reading; what the device then loses shows as gaps.
func (r *Runner) inlineLoop(tasks <-chan func(), gen uint64) bool {
	ctx := context.Background()
	for !r.stopping.Load() {
		select {
		case f := <-r.ctl:
			f()
			if !r.live(gen) {
				return false
			}
			continue
		case f := <-tasks:
			f()
			if !r.live(gen) {
				return false
			}
			continue
		default:
		}
		b, _ := r.cfg.Pool.Get(ctx)
		if err := r.read(&r.inlineRead, b); err != nil {
			b.Release()
			if err != io.EOF {
				r.fail(err)
			}
			return true
		}
		if !r.process(b, gen) {
			return false
		}
	}
	return true
}

// recordingTo tells the stages that blocks from now on belong to rec
// (nil: not recorded), if that changes; false if the loop was replaced.
func (r *Runner) recordingTo(rec *Recording, gen uint64) bool {
	if rec == r.current { // only the live loop writes it
		return true
	}
	r.stageMu.Lock()
	prev := r.current
	r.current = rec
	r.stageMu.Unlock()
	if rec == prev {
		return true
	}
	if prev != nil && !r.recordingHooks(nil, gen) {
		return false
	}
	if rec != nil && !r.recordingHooks(rec, gen) {
		return false
	}
	return true
}

// process runs the stages on b, hands its events to the outputs as they
// appear, and queues it for the consumers. False: the loop was replaced
// while a stage held b, which then belongs to nobody.
func (r *Runner) process(b *Block, gen uint64) bool {
	r.stageMu.Lock()
	if !r.live(gen) {
		r.stageMu.Unlock()
		return false
	}
	r.inStage = b
	r.stageMu.Unlock()
	if !r.recordingTo(b.Recording, gen) {
		return false
	}
	if r.cfg.KeepRaw {
		// The pool is sized for two blocks per block in flight, so this
		// waits only if a consumer holds blocks too long.
		if raw, err := r.cfg.Pool.Get(context.Background()); err == nil {
			raw.CopyFrom(b)
			b.Raw = raw
		}
	}
	t0 := time.Now()
	delivered := r.deliver(b, 0) // mirrored input lines go out at once
	for i, s := range r.cfg.Stages {
		ts := time.Now()
		err := s.Process(b)
		if !r.live(gen) {
			return false
		}
		r.stageTimes[i].Record(time.Since(ts))
		// The events this stage added reach the outputs the moment it
		// returns, before later stages and the recorder.
		delivered = r.deliver(b, delivered)
		if err != nil {
			r.stageErrors[i].Add(1)
			if ok, more := r.stageErrLog[i].Allow(time.Now()); ok {
				r.log.Error("stage failed on a block; the block passes on unchanged",
					zap.String("stage", s.Name()), zap.Int64("first_sample", b.FirstSample),
					zap.Error(err), zap.Int("more_not_logged", more))
			}
		}
	}
	done := time.Now()
	r.loopTime.Record(done.Sub(t0))
	r.latency.Record(done.Sub(b.ReadAt))
	r.processed.Add(1)
	r.events.Add(uint64(len(b.Events)))
	r.stageMu.Lock()
	r.inStage = nil
	r.stageMu.Unlock()
	r.consQ <- b
	return true
}

// deliver hands the block's events from index from on to the event sinks
// (they see only those) and returns how many events have been delivered.
func (r *Runner) deliver(b *Block, from int) int {
	all := b.Events
	if len(r.cfg.EventSinks) == 0 || from >= len(all) {
		return len(all)
	}
	b.Events = all[from:]
	for _, sink := range r.cfg.EventSinks {
		if err := sink.HandleEvents(b); err != nil {
			r.log.Error("event sink failed", zap.Error(err))
		}
	}
	b.Events = all
	return len(all)
}

func (r *Runner) recordingHooks(rec *Recording, gen uint64) bool {
	for _, s := range r.cfg.Stages {
		h, ok := s.(RecordingHooks)
		if !ok {
			continue
		}
		var err error
		if rec != nil {
			err = h.StartRecording(rec)
		} else {
			err = h.StopRecording()
		}
		if !r.live(gen) {
			return false
		}
		if err != nil {
			r.log.Error("stage recording hook failed", zap.String("stage", s.Name()), zap.Error(err))
		}
	}
	return true
}

// consumerPoll is how often the consumer loop looks at its queue once it
// has emptied it. It sleeps instead of waiting on the channel so that the
// stage thread's send never has to wake it: a waiting receiver costs the
// sender a futex wake-up, once per block, on the closed-loop path. With
// the closed-loop preset at 30000 one-sample blocks a second, waiting on
// the channel cost the stage thread 9000 futex calls a second, and this
// poll 170 (perf trace, docs/PERFORMANCE.md). The recorder then lags the
// stages by at most this much, which nothing depends on (its queue holds
// a second of blocks). Only with a real-time source (no Backpressure): a
// source read as fast as possible (playback, `ephysd process`) would be
// slowed by a sleep whenever its queue held less than a millisecond.
const consumerPoll = time.Millisecond

func (r *Runner) consumeLoop() {
	defer close(r.done)
	for {
		var b *Block
		var ok bool
		select {
		case b, ok = <-r.consQ:
		default:
			if !r.cfg.Backpressure {
				time.Sleep(consumerPoll)
				continue
			}
			b, ok = <-r.consQ
		}
		if !ok {
			r.endConsumers()
			return
		}
		if !r.consumerFailed.Load() {
			for _, c := range r.cfg.Consumers {
				if err := c.Consume(b); err != nil {
					r.consumerFailed.Store(true)
					r.fail(err)
					break
				}
			}
		}
		r.lastBlock.Store(time.Now().UnixNano())
		b.Release()
	}
}

// endConsumers ends the consumers once the queue is closed and empty.
func (r *Runner) endConsumers() {
	for _, c := range r.cfg.Consumers {
		if err := c.End(); err != nil {
			r.fail(err)
		}
	}
	if n := r.overrunLog.Pending(); n > 0 {
		r.log.Warn("overruns not logged individually", zap.Int("count", n))
	}
}
