package drivers

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// flaky is a device that delivers blocks paced at rate and fails after
// failAfter blocks (failAfter < 0: never); its sample numbers start at 0
// each time it is opened, as a re-enumerated device's would.
type flaky struct {
	rate      float64
	n, fail   int
	next      int64
	channels  int
	stopped   atomic.Bool
	closed    atomic.Bool
	startedAt time.Time
	// discarded is the bytes its parser dropped: one per block read, and
	// 1000 more when it is closed (its last partial frame).
	discarded atomic.Uint64
}

func (f *flaky) LinkStats() LinkStats {
	d := f.discarded.Load()
	return LinkStats{DiscardedBytes: d, Resyncs: d}
}

func (f *flaky) Info() pipeline.StreamInfo {
	return pipeline.StreamInfo{SampleRate: f.rate, Channels: make([]pipeline.ChannelInfo, f.channels)}
}
func (f *flaky) Start() error { f.startedAt = time.Now(); return nil }
func (f *flaky) Stop() error  { f.stopped.Store(true); return nil }
func (f *flaky) Close() error { f.closed.Store(true); f.discarded.Add(1000); return nil }
func (f *flaky) ReadBlock(b *pipeline.Block) error {
	if f.stopped.Load() {
		return io.EOF
	}
	if f.fail >= 0 && f.n == f.fail {
		return errors.New("read /dev/ttyACM0: input/output error")
	}
	f.n++
	f.discarded.Add(1)
	time.Sleep(time.Duration(float64(b.Cap()) / f.rate * float64(time.Second)))
	b.Samples = b.Cap()
	b.FirstSample = f.next
	f.next += int64(b.Samples)
	return nil
}

func TestReopeningSourceRecordsTheAbsenceAsAGap(t *testing.T) {
	var mu sync.Mutex
	opens := 0
	open := func() (Source, error) {
		mu.Lock()
		defer mu.Unlock()
		opens++
		switch opens {
		case 1:
			return &flaky{rate: 1000, fail: 5, channels: 2}, nil
		case 2, 3: // unplugged for two attempts
			return nil, errors.New("serial /dev/ttyACM0: no such device")
		case 4: // a different device on the same port
			return &flaky{rate: 1000, fail: -1, channels: 3}, nil
		default:
			return &flaky{rate: 1000, fail: -1, channels: 2}, nil
		}
	}
	r, err := NewReopeningSource("test device", open, nil, Backoff{Min: 20 * time.Millisecond, Max: 40 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	p, _ := pipeline.NewPool(1, 2, 10)
	defer p.Close(false)
	b := p.TryGet()
	defer b.Release()
	var firsts []int64
	for i := 0; i < 8; i++ {
		if err := r.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		firsts = append(firsts, b.FirstSample)
	}
	for i := 1; i < 5; i++ {
		if firsts[i] != firsts[i-1]+10 {
			t.Fatalf("before the unplug: %v", firsts)
		}
	}
	// Away for at least 3 backoff waits (≥ 20+40+40 ms) = ≥ 100 samples at 1 kHz.
	if gap := firsts[5] - (firsts[4] + 10); gap < 100 {
		t.Fatalf("gap of %d samples after ~100 ms away: %v", gap, firsts)
	}
	if firsts[6] != firsts[5]+10 || firsts[7] != firsts[6]+10 {
		t.Fatalf("after reconnecting: %v", firsts)
	}
	st := r.State()
	if !st.Connected || st.Disconnects != 1 || st.Reconnects != 1 || st.LastError == "" {
		t.Fatalf("state %+v", st)
	}
	if want := uint64(firsts[5] - (firsts[4] + 10)); st.GapSamples != want {
		t.Fatalf("GapSamples %d, the gap in sample numbers is %d", st.GapSamples, want)
	}
	// Link counts: the first device read 5 blocks and was closed (+1000),
	// the refused 3-channel one was closed unread (+1000), the current one
	// has read 3 blocks.
	if want := uint64(5 + 1000 + 1000 + 3); st.Link.DiscardedBytes != want || r.LinkStats() != st.Link {
		t.Fatalf("link counts %+v, want %d discarded bytes over the three devices", st.Link, want)
	}
	r.Close()
	if want := uint64(5 + 1000 + 1000 + 3 + 1000); r.State().Link.DiscardedBytes != want {
		t.Fatalf("after Close: link counts %+v, want %d", r.State().Link, want)
	}
	if opens != 5 {
		t.Fatalf("%d opens, want 5 (the 3-channel device must be refused)", opens)
	}
}

func TestReopeningSourceStopsWhileReopening(t *testing.T) {
	first := true
	open := func() (Source, error) {
		if first {
			first = false
			return &flaky{rate: 1000, fail: 0, channels: 1}, nil
		}
		return nil, errors.New("gone")
	}
	r, err := NewReopeningSource("d", open, nil, Backoff{Min: 10 * time.Millisecond, Max: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	p, _ := pipeline.NewPool(1, 1, 10)
	defer p.Close(false)
	b := p.TryGet()
	defer b.Release()
	done := make(chan error)
	go func() { done <- r.ReadBlock(b) }()
	time.Sleep(50 * time.Millisecond)
	r.Stop()
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("got %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Stop did not end the reopening")
	}
	r.Close()
}

type failingSink struct {
	fail    bool
	handled atomic.Int32
	closed  atomic.Bool
	bad     atomic.Uint64 // reply bytes it could not parse; 10 more when closed
}

func (s *failingSink) LinkStats() LinkStats {
	return LinkStats{DiscardedBytes: s.bad.Load(), Resyncs: 1}
}

func (s *failingSink) HandleEvents(b *pipeline.Block) error {
	if s.fail {
		return errors.New("write /dev/ttyACM1: no such device")
	}
	s.handled.Add(1)
	return nil
}
func (s *failingSink) Close() error { s.closed.Store(true); s.bad.Add(10); return nil }

func TestReopeningSinkDropsWhileAwayAndReconnects(t *testing.T) {
	var opens atomic.Int32
	var second *failingSink
	open := func() (Sink, error) {
		switch opens.Add(1) {
		case 1:
			s := &failingSink{fail: true}
			s.bad.Store(5)
			return s, nil
		case 2:
			return nil, errors.New("gone")
		default:
			second = &failingSink{}
			return second, nil
		}
	}
	r, err := NewReopeningSink("pulse pal", open, nil, Backoff{Min: 10 * time.Millisecond, Max: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	b := &pipeline.Block{Events: []pipeline.Event{{Kind: pipeline.EventTTL}}}
	r.HandleEvents(b) // fails: starts reopening
	r.HandleEvents(b) // dropped
	if r.Dropped() != 1 || r.State().Connected {
		t.Fatalf("dropped %d state %+v", r.Dropped(), r.State())
	}
	deadline := time.Now().Add(2 * time.Second)
	for !r.State().Connected && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	r.HandleEvents(b)
	if second == nil || second.handled.Load() != 1 {
		t.Fatal("events did not reach the reopened device")
	}
	// The first device's 5 + 10 (at its close), the second's 0 so far.
	if st := r.State(); st.Reconnects != 1 || st.Disconnects != 1 || st.Link != (LinkStats{DiscardedBytes: 15, Resyncs: 2}) {
		t.Fatalf("state %+v", st)
	}
	r.Close()
	if !second.closed.Load() {
		t.Fatal("Close did not close the device")
	}
	if l := r.LinkStats(); l != (LinkStats{DiscardedBytes: 25, Resyncs: 2}) {
		t.Fatalf("after Close: link counts %+v", l)
	}
}
