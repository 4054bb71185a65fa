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
	Reconnects  uint64    // times it came back (was reopened)
	LastError   string    // why it went away (or why reopening fails)
	Since       time.Time // when Connected last changed
	// GapSamples is the number of sample numbers skipped for the time the
	// device was away (a source only): the gaps the reopening made.
	GapSamples uint64
	// Link is what the drivers' parsers threw away (garbage, damaged
	// frames), summed over every time the device was opened.
	Link LinkStats
}

type stateBox struct {
	mu     sync.Mutex
	s      DeviceState
	opened bool
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
	if connected && !b.s.Connected {
		if b.opened {
			b.s.Reconnects++
		}
		b.opened = true
	}
	b.s.Connected = connected
	if err != nil {
		b.s.LastError = err.Error()
	}
}

func (b *stateBox) addGap(n int64) {
	b.mu.Lock()
	b.s.GapSamples += uint64(n)
	b.mu.Unlock()
}

// addLink adds the final link counts of a device that was closed.
func (b *stateBox) addLink(l LinkStats) {
	b.mu.Lock()
	b.s.Link = b.s.Link.Add(l)
	b.mu.Unlock()
}

// retire takes a device out with take (which reports whether it was still
// the current one) and closes it. Its link counts move to the total in the
// same step as it leaves (whoever reads the device's counts with the
// total holds b.mu), so they are never counted twice or missed; what it
// counts until it is closed is added after.
func (b *stateBox) retire(dev any, take func() bool, close func() error) (bool, error) {
	b.mu.Lock()
	if !take() {
		b.mu.Unlock()
		return false, nil
	}
	before := linkOf(dev)
	b.s.Link = b.s.Link.Add(before)
	b.mu.Unlock()
	err := close()
	after := linkOf(dev)
	b.addLink(LinkStats{DiscardedBytes: after.DiscardedBytes - before.DiscardedBytes, Resyncs: after.Resyncs - before.Resyncs})
	return true, err
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
func (r *ReopeningSource) State() DeviceState {
	// Under r.mu: a closed device's counts move to the total under the
	// same lock, so they are never counted twice or missed.
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state.get()
	s.Link = s.Link.Add(linkOf(r.cur))
	return s
}

// LinkStats is State().Link.
func (r *ReopeningSource) LinkStats() LinkStats { return r.State().Link }

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
					away := int64(time.Since(r.lostAt).Seconds() * r.info.SampleRate)
					target += away
					r.state.addGap(away)
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
		// Close before taking the device out of State, so its final link
		// counts move from the device to the total without a moment
		// where they are counted twice or not at all.
		cur.Close()
		r.mu.Lock()
		r.cur = nil
		r.state.addLink(linkOf(cur))
		r.mu.Unlock()
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
				r.state.addLink(linkOf(src))
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
			r.state.addLink(linkOf(src))
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
func (r *ReopeningSink) State() DeviceState {
	// The box is read under the state lock: a failing device's counts
	// move to the total under the same lock, so they are never counted
	// twice or missed.
	r.state.mu.Lock()
	defer r.state.mu.Unlock()
	s := r.state.s
	if box := r.cur.Load(); box != nil {
		s.Link = s.Link.Add(linkOf(box.s))
	}
	return s
}

// LinkStats is State().Link.
func (r *ReopeningSink) LinkStats() LinkStats { return r.State().Link }

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
	if ok, _ := r.retire(box, func() {
		r.log.Error("output device failed; reopening it with backoff", zap.String("device", r.name), zap.Error(err))
		r.state.set(false, err)
	}); !ok {
		return nil
	}
	r.wg.Add(1)
	go r.reopen()
	return nil
}

// retire takes box's device out, if it is still the current one, calls
// gone (when not nil) and closes the device.
func (r *ReopeningSink) retire(box *sinkBox, gone func()) (bool, error) {
	return r.state.retire(box.s, func() bool { return r.cur.CompareAndSwap(box, nil) }, func() error {
		if gone != nil {
			gone()
		}
		return box.s.Close()
	})
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
	if box := r.cur.Load(); box != nil {
		_, err := r.retire(box, nil)
		return err
	}
	return nil
}
