// Package hanguptest runs a serial device family through repeated
// hang-ups while it is in use, as a test: a fake device on a real
// pseudo-terminal behind a stable link (like /dev/serial/by-id/…) is
// unplugged — its master closed — and a new one plugged in at the same
// link, again and again, while the driver is read through
// drivers.ReopeningSource (or written through drivers.ReopeningSink), the
// way the daemon runs it.
//
// RunSource checks that every hang-up is reported (log line and counter),
// that the device is reopened, that the time away becomes one gap in
// sample numbers (never filled: every sample read is compared with what
// the fake sent), and that the goroutines and file descriptors of the
// process are back to their start values afterwards. RunSink does the same
// for an output device: every hang-up reported and reopened, and events
// reach each new device.
//
// Count gives the number of hang-ups to run: the short count in `make
// test`, the long one when EPHYSD_LONG_TESTS=1 (`make soak` sets it).
package hanguptest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
)

// Long reports whether the long versions of the tests should run
// (EPHYSD_LONG_TESTS=1).
func Long() bool { return os.Getenv("EPHYSD_LONG_TESTS") == "1" }

// Count returns short, or long when EPHYSD_LONG_TESTS=1.
func Count(short, long int) int {
	if Long() {
		return long
	}
	return short
}

// Resources are what a leak would grow: the process's goroutines and open
// file descriptors.
type Resources struct {
	Goroutines int
	FDs        int
	fds        map[string]string // fd → what it is, for the failure message
}

// Measure counts the goroutines and the entries of /proc/self/fd now.
func Measure() Resources {
	r := Resources{Goroutines: runtime.NumGoroutine(), fds: map[string]string{}}
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		r.fds[e.Name()] = l
	}
	// The ReadDir above had the directory open itself.
	r.FDs = len(r.fds) - 1
	return r
}

// ExpectBack waits up to 10 s for the goroutines and file descriptors to
// come back to within tolerance of want (goroutines and fds that end
// asynchronously — a timer's goroutine, a reader that sees its port
// closed — need a moment), and fails the test if they do not, listing the
// extra descriptors and the goroutines' stacks.
func ExpectBack(t testing.TB, what string, want Resources, tolGoroutines, tolFDs int) Resources {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := Measure()
		if got.Goroutines <= want.Goroutines+tolGoroutines && got.FDs <= want.FDs+tolFDs {
			return got
		}
		if time.Now().After(deadline) {
			var extra []string
			for fd, l := range got.fds {
				if want.fds[fd] != l {
					extra = append(extra, fd+" → "+l)
				}
			}
			sort.Strings(extra)
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%s: %d goroutines and %d fds, want at most %d+%d and %d+%d (leak)\nnew fds: %v\ngoroutines:\n%s",
				what, got.Goroutines, got.FDs, want.Goroutines, tolGoroutines, want.FDs, tolFDs, extra, buf)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Logger returns a logger that keeps what is logged at Info and above.
func Logger() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.InfoLevel)
	return zap.New(core), logs
}

// CountLogs counts the entries whose message starts with prefix.
func CountLogs(logs *observer.ObservedLogs, prefix string) int {
	n := 0
	for _, e := range logs.All() {
		if strings.HasPrefix(e.Message, prefix) {
			n++
		}
	}
	return n
}

// Source describes the device family RunSource exercises.
type Source struct {
	// Name names the device in logs.
	Name string
	// Rate is the stream's sample rate.
	Rate float64
	// Plug starts fake device number i (0, 1, …) behind the same link
	// every time and returns what unplugs it: closes the pseudo-terminal's
	// master (the driver sees the hang-up), removes the link and ends the
	// fake's goroutines.
	Plug func(i int) (unplug func())
	// Open opens the driver on the link (the ReopeningSource calls it to
	// reopen too).
	Open func() (drivers.Source, error)
	// Check compares sample k of a device's stream (k counts from 0 for
	// each fake) with what was read: values (one per channel) and the
	// digital word. It returns what differs, or nil.
	Check func(k int64, values []float32, digital uint64) error
	// BlockSamples is the capacity of the blocks read (default 8).
	BlockSamples int
	// Samples is how many samples are read from each device before it is
	// unplugged.
	Samples int
	// HangUps is the number of hang-ups.
	HangUps int
	// Backoff of the reopening; its Min is also the least time away, so a
	// gap is at least Min × Rate samples.
	Backoff drivers.Backoff
	// Delay: every second device is plugged in only this long after the
	// previous one was pulled out, so that reopening fails a few times
	// first (the link is missing meanwhile). Default 5 × Backoff.Min.
	Delay time.Duration
}

// SourceResult is what RunSource measured.
type SourceResult struct {
	Samples int64           // samples read and checked
	Gaps    []int64         // per hang-up: the sample numbers skipped
	Away    []time.Duration // per hang-up: from the unplug to the next device's first block
	State   drivers.DeviceState
	Logs    *observer.ObservedLogs
}

// segment is what the reader saw of one device.
type segment struct {
	start   int64 // sample number of its first sample
	n       int64 // samples read
	firstAt time.Time
	gap     int64 // sample numbers skipped before it
}

// progress is shared between the reading goroutine and the test.
type progress struct {
	mu      sync.Mutex
	changed chan struct{}
	segs    []segment
	err     error
	done    bool
}

func (p *progress) update(f func()) {
	p.mu.Lock()
	f()
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

// waitFor waits until cond holds (true), the reader failed or ended
// (false), or the hang guard expires (false).
func (p *progress) waitFor(cond func() bool, guard time.Duration) bool {
	deadline := time.After(guard)
	for {
		p.mu.Lock()
		ok, stop, ch := cond(), p.err != nil || p.done, p.changed
		p.mu.Unlock()
		if ok {
			return true
		}
		if stop {
			return false
		}
		select {
		case <-ch:
		case <-deadline:
			return false
		}
	}
}

// RunSource plugs device 0, reads it through a ReopeningSource from a
// goroutine of its own (as the pipeline does), and hangs it up s.HangUps
// times, each time after s.Samples samples, plugging a new device at the
// same link. Every sample is checked with s.Check, each gap against the
// time away, the counters and logs against the number of hang-ups, and
// the process's goroutines and file descriptors against their values
// before (with device 0 streaming) and after (everything closed).
func RunSource(t *testing.T, s Source) SourceResult {
	t.Helper()
	if s.BlockSamples == 0 {
		s.BlockSamples = 8
	}
	if s.Backoff.Min == 0 {
		s.Backoff = drivers.Backoff{Min: 20 * time.Millisecond, Max: 40 * time.Millisecond}
	}
	if s.Delay == 0 {
		s.Delay = 5 * s.Backoff.Min
	}
	log, logs := Logger()

	warmUp()
	before := Measure()

	unplug := s.Plug(0)
	rs, err := drivers.NewReopeningSource(s.Name, s.Open, log, s.Backoff)
	if err != nil {
		unplug()
		t.Fatalf("opening %s: %v", s.Name, err)
	}
	if err := rs.Start(); err != nil {
		rs.Close()
		unplug()
		t.Fatalf("starting %s: %v", s.Name, err)
	}
	nch := len(rs.Info().Channels)
	pool, err := pipeline.NewPool(1, nch, s.BlockSamples)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close(false)
	b := pool.TryGet()
	defer b.Release()

	p := &progress{changed: make(chan struct{})}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		read(rs, b, nch, s.Check, p)
	}()
	closed := false
	cleanup := func() {
		if closed {
			return
		}
		closed = true
		rs.Stop()
		<-readerDone
		rs.Close()
		unplug()
	}
	defer cleanup() // when the test fails

	var unpluggedAt []time.Time
	var during Resources
	for i := 0; ; i++ {
		ok := p.waitFor(func() bool { return len(p.segs) > i && p.segs[i].n >= int64(s.Samples) }, 20*time.Second)
		if !ok {
			p.mu.Lock()
			err, segs := p.err, append([]segment(nil), p.segs...)
			p.mu.Unlock()
			cleanup()
			if err != nil {
				t.Fatalf("%s, device %d: %v", s.Name, i, err)
			}
			t.Fatalf("%s: device %d: fewer than %d samples within 20 s (segments read: %+v; device state %+v)", s.Name, i, s.Samples, segs, rs.State())
		}
		if i == 0 {
			during = Measure()
		}
		if i == s.HangUps {
			break
		}
		// The time before the hang-up: the driver may see it before
		// unplug returns.
		unpluggedAt = append(unpluggedAt, time.Now())
		unplug()
		if i%2 == 1 {
			time.Sleep(s.Delay)
		}
		unplug = s.Plug(i + 1)
	}
	// The same device count is open as after device 0 came up: every
	// reopened port, reader goroutine and fake's goroutine of the devices
	// pulled out must be gone.
	ExpectBack(t, fmt.Sprintf("%s: streaming from device %d after %d hang-ups, compared with device 0", s.Name, s.HangUps, s.HangUps), during, 2, 0)
	res := SourceResult{State: rs.State(), Logs: logs}
	cleanup()
	ExpectBack(t, s.Name+": after closing everything", before, 2, 0)

	p.mu.Lock()
	segs := p.segs
	p.mu.Unlock()
	if len(segs) != s.HangUps+1 {
		t.Fatalf("%s: %d runs of consecutive sample numbers for %d hang-ups, want %d", s.Name, len(segs), s.HangUps, s.HangUps+1)
	}
	minGap := int64(s.Backoff.Min.Seconds() * s.Rate)
	var sum int64
	for i, sg := range segs {
		res.Samples += sg.n
		if i == 0 {
			continue
		}
		away := sg.firstAt.Sub(unpluggedAt[i-1])
		res.Gaps = append(res.Gaps, sg.gap)
		res.Away = append(res.Away, away)
		sum += sg.gap
		// The time away is at least one backoff wait, and at most the time
		// from the unplug to the first block of the next device.
		if maxGap := int64(away.Seconds()*s.Rate) + 1; sg.gap < minGap || sg.gap > maxGap {
			t.Errorf("%s: hang-up %d: gap of %d samples; %.1f ms away from the unplug to the next device's first block at %g Hz allows %d–%d",
				s.Name, i, sg.gap, away.Seconds()*1000, s.Rate, minGap, maxGap)
		}
	}
	st := res.State
	if st.Disconnects != uint64(s.HangUps) || st.Reconnects != uint64(s.HangUps) || !st.Connected {
		t.Errorf("%s: device state %+v after %d hang-ups", s.Name, st, s.HangUps)
	}
	if st.GapSamples != uint64(sum) {
		t.Errorf("%s: the source counts %d samples of gaps, the sample numbers skip %d", s.Name, st.GapSamples, sum)
	}
	if n := CountLogs(logs, "device disconnected"); n != s.HangUps {
		t.Errorf("%s: %d \"device disconnected\" log lines for %d hang-ups", s.Name, n, s.HangUps)
	}
	if n := CountLogs(logs, "device reconnected"); n != s.HangUps {
		t.Errorf("%s: %d \"device reconnected\" log lines for %d hang-ups", s.Name, n, s.HangUps)
	}
	if s.HangUps >= 2 && CountLogs(logs, "device still missing") == 0 {
		t.Errorf("%s: no \"device still missing\" log line although devices came back only %v after the unplug", s.Name, s.Delay)
	}
	return res
}

// read reads blocks until the source ends, splitting the stream into
// segments at jumps in sample numbers and checking every sample.
func read(rs *drivers.ReopeningSource, b *pipeline.Block, nch int, check func(int64, []float32, uint64) error, p *progress) {
	vals := make([]float32, nch)
	var next int64
	for {
		b.Reset()
		err := rs.ReadBlock(b)
		if errors.Is(err, io.EOF) {
			p.update(func() { p.done = true })
			return
		}
		if err != nil {
			p.update(func() { p.err = fmt.Errorf("ReadBlock: %w", err) })
			return
		}
		now := time.Now()
		first := b.FirstSample
		var fail error
		p.mu.Lock()
		if len(p.segs) == 0 || first != next {
			// A new device: its samples count from 0 again.
			gap := first - next
			if len(p.segs) == 0 {
				gap = 0
			} else if gap < 0 {
				fail = fmt.Errorf("sample numbers went back from %d to %d", next, first)
			}
			p.segs = append(p.segs, segment{start: first, firstAt: now, gap: gap})
		}
		dev := len(p.segs) - 1
		start := p.segs[dev].start
		p.mu.Unlock()
		for i := 0; i < b.Samples && fail == nil; i++ {
			for c := range vals {
				vals[c] = b.Data[c*b.Samples+i]
			}
			k := first + int64(i) - start
			if err := check(k, vals, b.Digital[i]); err != nil {
				fail = fmt.Errorf("device %d, its sample %d (sample number %d): %v", dev, k, first+int64(i), err)
			}
		}
		next = first + int64(b.Samples)
		p.update(func() {
			p.segs[dev].n += int64(b.Samples)
			if fail != nil {
				p.err = fail
			}
		})
		if fail != nil {
			return
		}
	}
}

// warmUp makes the runtime and the process create what they keep for
// good on first use (the network poller's descriptors, the timer
// goroutine's state), so that the first measurement is not low.
func warmUp() {
	r, w, err := os.Pipe()
	if err == nil {
		r.SetReadDeadline(time.Now().Add(time.Millisecond))
		r.Read(make([]byte, 1))
		r.Close()
		w.Close()
	}
}

// Sink describes the output device family RunSink exercises.
type Sink struct {
	Name string
	// Plug starts fake device i behind the same link every time; it
	// returns what unplugs it and how many events it has received.
	Plug func(i int) (unplug func(), received func() int)
	// Open opens the driver on the link.
	Open func() (drivers.Sink, error)
	// Block returns the n-th block of events (n = 0, 1, …) the sink is
	// given; each should make the device receive one event.
	Block func(n int) *pipeline.Block
	// Events is how many events each device receives before it is
	// unplugged.
	Events  int
	HangUps int
	Backoff drivers.Backoff
	// Delay: every second device is plugged in only this long after the
	// previous one was pulled out. Default 5 × Backoff.Min.
	Delay time.Duration
	// Every is the time between two blocks (default 1 ms).
	Every time.Duration
}

// SinkResult is what RunSink measured.
type SinkResult struct {
	Blocks   int    // blocks given to the sink
	Received []int  // per device: events received
	Dropped  uint64 // blocks whose events were dropped while a device was away
	State    drivers.DeviceState
	Logs     *observer.ObservedLogs
}

// RunSink plugs device 0, opens it through a ReopeningSink and gives it a
// block every s.Every from the test goroutine (the stage thread, in the
// daemon); after each device has received s.Events events it is hung up
// and a new one plugged at the same link. It checks the counters and logs
// against the number of hang-ups, that every device received events, and
// the goroutines and file descriptors.
func RunSink(t *testing.T, s Sink) SinkResult {
	t.Helper()
	if s.Backoff.Min == 0 {
		s.Backoff = drivers.Backoff{Min: 20 * time.Millisecond, Max: 40 * time.Millisecond}
	}
	if s.Delay == 0 {
		s.Delay = 5 * s.Backoff.Min
	}
	if s.Every == 0 {
		s.Every = time.Millisecond
	}
	log, logs := Logger()
	warmUp()
	before := Measure()

	unplug, received := s.Plug(0)
	rs, err := drivers.NewReopeningSink(s.Name, s.Open, log, s.Backoff)
	if err != nil {
		unplug()
		t.Fatalf("opening %s: %v", s.Name, err)
	}
	res := SinkResult{Logs: logs}
	closed := false
	defer func() { // when the test fails
		if !closed {
			rs.Close()
			unplug()
		}
	}()
	var during Resources
	for i := 0; ; i++ {
		deadline := time.Now().Add(20 * time.Second)
		for received() < s.Events {
			if time.Now().After(deadline) {
				st := rs.State()
				t.Fatalf("%s: device %d received %d of %d events within 20 s (state %+v)", s.Name, i, received(), s.Events, st)
			}
			rs.HandleEvents(s.Block(res.Blocks))
			res.Blocks++
			time.Sleep(s.Every)
		}
		res.Received = append(res.Received, received())
		if i == 0 {
			during = Measure()
		}
		if i == s.HangUps {
			break
		}
		unplug()
		if i%2 == 1 {
			// Keep the stage thread going while the device is away.
			for end := time.Now().Add(s.Delay); time.Now().Before(end); {
				rs.HandleEvents(s.Block(res.Blocks))
				res.Blocks++
				time.Sleep(s.Every)
			}
		}
		unplug, received = s.Plug(i + 1)
	}
	ExpectBack(t, fmt.Sprintf("%s: device %d in use after %d hang-ups, compared with device 0", s.Name, s.HangUps, s.HangUps), during, 2, 0)
	res.State, res.Dropped = rs.State(), rs.Dropped()
	closed = true
	rs.Close()
	unplug()
	ExpectBack(t, s.Name+": after closing everything", before, 2, 0)

	st := res.State
	if st.Disconnects != uint64(s.HangUps) || st.Reconnects != uint64(s.HangUps) || !st.Connected {
		t.Errorf("%s: device state %+v after %d hang-ups", s.Name, st, s.HangUps)
	}
	if n := CountLogs(logs, "output device failed"); n != s.HangUps {
		t.Errorf("%s: %d \"output device failed\" log lines for %d hang-ups", s.Name, n, s.HangUps)
	}
	if n := CountLogs(logs, "output device reconnected"); n != s.HangUps {
		t.Errorf("%s: %d \"output device reconnected\" log lines for %d hang-ups", s.Name, n, s.HangUps)
	}
	if s.HangUps >= 2 && (res.Dropped == 0 || CountLogs(logs, "output device is away") == 0) {
		t.Errorf("%s: %d blocks of events dropped (and logged) although the stage thread went on while devices were away", s.Name, res.Dropped)
	}
	return res
}
