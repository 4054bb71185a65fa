package drivers

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// Clock paces a source to the wall clock — sample n is due n/rate seconds
// after Start, with no drift over long runs — and lets Stop, from any
// goroutine, end a wait at once. Sources that replay or simulate data use
// it; live devices are paced by the device itself.
type Clock struct {
	rate    float64
	start   time.Time
	started bool
	timer   *time.Timer

	stop    chan struct{}
	once    sync.Once
	stopped atomic.Bool
}

// NewClock returns a clock for a stream of rate samples per second.
func NewClock(rate float64) *Clock {
	return &Clock{rate: rate, stop: make(chan struct{})}
}

// ErrAlreadyStarted is returned by a second Start.
var ErrAlreadyStarted = errors.New("source already started")

// Start sets time zero.
func (c *Clock) Start() error {
	if c.started {
		return ErrAlreadyStarted
	}
	c.started = true
	c.start = time.Now()
	c.timer = time.NewTimer(time.Hour)
	c.timer.Stop()
	return nil
}

// Started reports whether Start was called.
func (c *Clock) Started() bool { return c.started }

// Stop ends a pending WaitUntil and makes every later one return io.EOF.
func (c *Clock) Stop() {
	c.once.Do(func() {
		c.stopped.Store(true)
		close(c.stop)
	})
}

// Stopped reports whether Stop was called.
func (c *Clock) Stopped() bool { return c.stopped.Load() }

// WaitUntil sleeps until the wall clock reaches the time of sample n
// (counted from Start), or returns io.EOF at once when stopped.
func (c *Clock) WaitUntil(n int64) error {
	if c.stopped.Load() {
		return io.EOF
	}
	d := time.Until(c.start.Add(time.Duration(float64(n) / c.rate * float64(time.Second))))
	if d <= 0 {
		return nil
	}
	c.timer.Reset(d)
	select {
	case <-c.timer.C:
		return nil
	case <-c.stop:
		c.timer.Stop()
		return io.EOF
	}
}
