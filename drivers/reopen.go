package drivers

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
)

// Backoff is how long to wait between attempts to reopen a device.
type Backoff struct {
	Min, Max time.Duration // defaults 100 ms and 5 s; doubles each attempt
}

func (b Backoff) next(d time.Duration) time.Duration {
	if b.Min <= 0 {
		b.Min = 100 * time.Millisecond
	}
	if b.Max <= 0 {
		b.Max = 5 * time.Second
	}
	if d < b.Min {
		return b.Min
	}
	d *= 2
	if d > b.Max {
		d = b.Max
	}
	return d
}

// DeviceState is what a reopening source or sink reports about its device.
type DeviceState struct {
	Connected   bool
	Disconnects uint64    // times the device went away
	LastError   string    // why it went away (or why reopening fails)
	Since       time.Time // when Connected last changed
}

type stateBox struct {
	mu sync.Mutex
	s  DeviceState
}

func (b *stateBox) set(connected bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.s.Connected != connected {
		b.s.Since = time.Now()
	}
	if !connected && b.s.Connected {
		b.s.Disconnects++
	}
	b.s.Connected = connected
	if err != nil {
		b.s.LastError = err.Error()
	}
}

func (b *stateBox) get() DeviceState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.s
}

// ReopeningSource wraps a live device's source: when the device disappears
// (ReadBlock fails), it is closed and reopened with backoff, and the time it
// was away becomes a gap in sample numbers (time away × rate) — never
// filled. The device must come back with the same stream shape.
type ReopeningSource struct {
	open    func() (Source, error)
	name    string
	log     *zap.Logger
	backoff Backoff

	mu       sync.Mutex // guards cur against Stop from another goroutine
	cur      Source
	info     pipeline.StreamInfo
	next     int64 // our sample number after the last block delivered
	offset   int64 // added to the current device's sample numbers
	fresh    bool  // the next block is the first from a (re)opened device
	lostAt   time.Time
	stopped  atomic.Bool
	stop     chan struct{}
	stopOnce sync.Once
	state    stateBox
}

// NewReopeningSource opens the device once (an error here is returned as
// is: at start-up the user should hear at once that the device is missing)
// and returns the wrapper. name identifies the device in logs.
func NewReopeningSource(name string, open func() (Source, error), log *zap.Logger, b Backoff) (*ReopeningSource, error) {
	src, err := open()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	r := &ReopeningSource{open: open, name: name, log: log, backoff: b, cur: src, info: src.Info(), fresh: true, stop: make(chan struct{})}
	r.state.set(true, nil)
	return r, nil
}

// Info describes the stream (as the device first announced it).
func (r *ReopeningSource) Info() pipeline.StreamInfo { return r.info }

// Start starts the device.
func (r *ReopeningSource) Start() error { return r.current().Start() }

// State reports the device's connection state.
func (r *ReopeningSource) State() DeviceState { return r.state.get() }

// ReadBlock reads the next block, reopening the device as often as needed.
func (r *ReopeningSource) ReadBlock(b *pipeline.Block) error {
	for {
		if r.stopped.Load() {
			return io.EOF
		}
		if r.current() == nil {
			if err := r.reopen(); err != nil {
				return err
			}
		}
		cur := r.current()
		err := cur.ReadBlock(b)
		if err == nil {
			if r.fresh {
				target := r.next
				if !r.lostAt.IsZero() {
					target += int64(time.Since(r.lostAt).Seconds() * r.info.SampleRate)
				}
				r.offset = target - b.FirstSample
				r.fresh = false
			}
			b.FirstSample += r.offset
			r.next = b.FirstSample + int64(b.Samples)
			return nil
		}
		if r.stopped.Load() || errors.Is(err, io.EOF) {
			return io.EOF
		}
		r.log.Error("device disconnected; reopening it with backoff (the time it is away is recorded as a gap)",
			zap.String("device", r.name), zap.Error(err))
		r.state.set(false, err)
		r.lostAt = time.Now()
		r.mu.Lock()
		r.cur = nil
		r.mu.Unlock()
		cur.Close()
	}
}

func (r *ReopeningSource) current() Source {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// reopen tries until the device is back or Stop is called.
func (r *ReopeningSource) reopen() error {
	var wait time.Duration
	attempt := 0
	for {
		wait = r.backoff.next(wait)
		select {
		case <-r.stop:
			return io.EOF
		case <-time.After(wait):
		}
		attempt++
		src, err := r.open()
		if err == nil {
			err = r.checkShape(src.Info())
			if err == nil {
				err = src.Start()
			}
			if err != nil {
				src.Close()
			}
		}
		if err != nil {
			r.state.set(false, err)
			if attempt == 1 || attempt%10 == 0 {
				r.log.Warn("device still missing", zap.String("device", r.name), zap.Int("attempt", attempt), zap.Error(err))
			}
			continue
		}
		r.mu.Lock()
		if r.stopped.Load() { // stopped while opening
			r.mu.Unlock()
			src.Close()
			return io.EOF
		}
		r.cur = src
		r.mu.Unlock()
		r.fresh = true
		r.state.set(true, nil)
		r.log.Info("device reconnected", zap.String("device", r.name), zap.Int("attempts", attempt),
			zap.Duration("away", time.Since(r.lostAt)))
		return nil
	}
}

func (r *ReopeningSource) checkShape(in pipeline.StreamInfo) error {
	if len(in.Channels) != len(r.info.Channels) || in.SampleRate != r.info.SampleRate {
		return fmt.Errorf("%s came back with %d channels at %g Hz, but the recording has %d at %g Hz: restart acquisition to change the stream",
			r.name, len(in.Channels), in.SampleRate, len(r.info.Channels), r.info.SampleRate)
	}
	return nil
}

// Stop makes a pending ReadBlock (or reopening) return io.EOF.
func (r *ReopeningSource) Stop() error {
	r.stopOnce.Do(func() {
		r.stopped.Store(true)
		close(r.stop)
	})
	if cur := r.current(); cur != nil {
		return cur.Stop()
	}
	return nil
}

// Close closes the device.
func (r *ReopeningSource) Close() error {
	r.Stop()
	if cur := r.current(); cur != nil {
		return cur.Close()
	}
	return nil
}

// ReopeningSink wraps an output device: when a write fails the device is
// closed and reopened in the background with backoff; events meanwhile are
// dropped, counted and logged (an output cannot be delayed meaningfully).
type ReopeningSink struct {
	open    func() (Sink, error)
	name    string
	log     *zap.Logger
	backoff Backoff

	cur     atomic.Pointer[sinkBox]
	closed  chan struct{}
	closeMu sync.Once
	wg      sync.WaitGroup
	dropped atomic.Uint64
	dropLog pipeline.LogLimiter
	state   stateBox
}

type sinkBox struct{ s Sink }

// NewReopeningSink opens the device once and returns the wrapper.
func NewReopeningSink(name string, open func() (Sink, error), log *zap.Logger, b Backoff) (*ReopeningSink, error) {
	s, err := open()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	r := &ReopeningSink{open: open, name: name, log: log, backoff: b, closed: make(chan struct{})}
	r.cur.Store(&sinkBox{s})
	r.state.set(true, nil)
	return r, nil
}

// State reports the device's connection state.
func (r *ReopeningSink) State() DeviceState { return r.state.get() }

// Dropped is the number of blocks whose events were dropped while the
// device was away.
func (r *ReopeningSink) Dropped() uint64 { return r.dropped.Load() }

// HandleEvents passes the block to the device, or drops its events while
// the device is being reopened.
func (r *ReopeningSink) HandleEvents(b *pipeline.Block) error {
	box := r.cur.Load()
	if box == nil {
		if len(b.Events) > 0 {
			r.dropped.Add(1)
			if ok, more := r.dropLog.Allow(time.Now()); ok {
				r.log.Warn("output device is away: events dropped", zap.String("device", r.name),
					zap.Int64("first_sample", b.FirstSample), zap.Int("more_not_logged", more))
			}
		}
		return nil
	}
	err := box.s.HandleEvents(b)
	if err == nil {
		return nil
	}
	if !r.cur.CompareAndSwap(box, nil) {
		return nil
	}
	r.log.Error("output device failed; reopening it with backoff", zap.String("device", r.name), zap.Error(err))
	r.state.set(false, err)
	box.s.Close()
	r.wg.Add(1)
	go r.reopen()
	return nil
}

func (r *ReopeningSink) reopen() {
	defer r.wg.Done()
	var wait time.Duration
	for attempt := 1; ; attempt++ {
		wait = r.backoff.next(wait)
		select {
		case <-r.closed:
			return
		case <-time.After(wait):
		}
		s, err := r.open()
		if err != nil {
			r.state.set(false, err)
			if attempt == 1 || attempt%10 == 0 {
				r.log.Warn("output device still missing", zap.String("device", r.name), zap.Int("attempt", attempt), zap.Error(err))
			}
			continue
		}
		select {
		case <-r.closed:
			s.Close()
			return
		default:
		}
		r.cur.Store(&sinkBox{s})
		r.state.set(true, nil)
		r.log.Info("output device reconnected", zap.String("device", r.name), zap.Int("attempts", attempt))
		return
	}
}

// Close stops reopening and closes the device.
func (r *ReopeningSink) Close() error {
	r.closeMu.Do(func() { close(r.closed) })
	r.wg.Wait()
	if box := r.cur.Swap(nil); box != nil {
		return box.s.Close()
	}
	return nil
}
