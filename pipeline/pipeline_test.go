package pipeline

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestAppendEdges(t *testing.T) {
	words := []uint64{0b01, 0b01, 0b10, 0b11, 0b00}
	ev, last := AppendEdges(nil, 100, 0, words, 1000)
	type e struct {
		line  uint8
		state bool
		at    int64
		full  uint64
	}
	want := []e{{0, true, 1000, 1}, {0, false, 1002, 2}, {1, true, 1002, 2}, {0, true, 1003, 3}, {0, false, 1004, 0}, {1, false, 1004, 0}}
	if len(ev) != len(want) || last != 0 {
		t.Fatalf("got %d events %+v, last %b", len(ev), ev, last)
	}
	for i, w := range want {
		g := ev[i]
		if g.Line != w.line || g.State != w.state || g.SampleNumber != w.at || g.FullWord != w.full || g.Processor != 100 || g.Kind != EventTTL {
			t.Errorf("event %d: got %+v want %+v", i, g, w)
		}
	}
	// Line 63 and a state carried over from the previous block.
	ev, last = AppendEdges(ev[:0], 1, 1<<63, []uint64{1 << 63, 0}, 5)
	if len(ev) != 1 || ev[0].Line != 63 || ev[0].State || ev[0].SampleNumber != 6 || last != 0 {
		t.Fatalf("line 63: %+v", ev)
	}
}

func TestTruncateKeepsChannelMajorLayout(t *testing.T) {
	p, _ := NewPool(1, 3, 8)
	defer p.Close(false)
	b := p.TryGet()
	for c := 0; c < 3; c++ {
		for i := 0; i < 8; i++ {
			b.Data[c*8+i] = float32(c*100 + i)
		}
	}
	b.Truncate(5)
	for c := 0; c < 3; c++ {
		ch := b.Channel(c)
		if len(ch) != 5 {
			t.Fatal(len(ch))
		}
		for i, v := range ch {
			if v != float32(c*100+i) {
				t.Fatalf("ch %d sample %d = %v", c, i, v)
			}
		}
	}
	b.Release()
}

func TestPoolReuseAndDoubleRelease(t *testing.T) {
	p, _ := NewPool(2, 1, 4)
	a, b := p.TryGet(), p.TryGet()
	if p.TryGet() != nil {
		t.Fatal("pool of 2 gave a third block")
	}
	a.Events = append(a.Events, Event{})
	a.Release()
	if c := p.TryGet(); c != a || len(c.Events) != 0 || c.Samples != 4 {
		t.Fatal("released block not reset and reused")
	}
	a.Release()
	b.Release()
	defer func() {
		if recover() == nil {
			t.Fatal("double release not caught")
		}
		p.Close(false)
	}()
	b.Release()
}

func TestHistogramQuantiles(t *testing.T) {
	var h Histogram
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Microsecond)
	}
	check := func(q float64, want time.Duration) {
		got := h.Quantile(q)
		if got < want*95/100 || got > want*105/100 {
			t.Errorf("q%.2f = %v, want ≈ %v", q, got, want)
		}
	}
	check(0.5, 500*time.Microsecond)
	check(0.99, 990*time.Microsecond)
	if h.Max() != time.Millisecond || h.Count() != 1000 {
		t.Fatal(h.Max(), h.Count())
	}
}

// counter is a source of numbered blocks; with pace > 0 it waits between
// blocks like a device.
type counter struct {
	blocks int
	n      int
	next   int64
	skipAt int // a sample-number jump (device gap) before this block
	pace   time.Duration
	word   func(sample int64) uint64
}

func (c *counter) ReadBlock(b *Block) error {
	if c.n == c.blocks {
		return io.EOF
	}
	if c.pace > 0 {
		time.Sleep(c.pace)
	}
	if c.n == c.skipAt && c.n > 0 {
		c.next += 1000
	}
	c.n++
	b.FirstSample = c.next
	for ch := 0; ch < b.Channels; ch++ {
		for i, x := range b.Channel(ch) {
			_ = x
			b.Channel(ch)[i] = float32(c.next + int64(i))
		}
	}
	for i := 0; i < b.Samples; i++ {
		if c.word != nil {
			b.Digital[i] = c.word(c.next + int64(i))
		}
	}
	c.next += int64(b.Samples)
	return nil
}

type slowStage struct{ delay time.Duration }

func (s slowStage) Name() string { return "slow" }
func (s slowStage) Process(b *Block) error {
	time.Sleep(s.delay)
	return nil
}

type hookStage struct {
	mu  sync.Mutex
	log []string
}

func (h *hookStage) Name() string { return "hooks" }
func (h *hookStage) Process(b *Block) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := "-"
	if b.Recording != nil {
		rec = "R"
	}
	h.log = append(h.log, rec)
	return nil
}
func (h *hookStage) StartAcquisition() error { h.add("start_acq"); return nil }
func (h *hookStage) StopAcquisition() error  { h.add("stop_acq"); return nil }
func (h *hookStage) StartRecording(r *Recording) error {
	h.add("start_rec")
	return nil
}
func (h *hookStage) StopRecording() error { h.add("stop_rec"); return nil }
func (h *hookStage) add(s string) {
	h.mu.Lock()
	h.log = append(h.log, s)
	h.mu.Unlock()
}

type sink struct {
	firsts  []int64
	samples int
	events  int
	ended   bool
}

func (s *sink) Consume(b *Block) error {
	s.firsts = append(s.firsts, b.FirstSample)
	s.samples += b.Samples
	s.events += len(b.Events)
	for i := 0; i < b.Samples; i++ {
		if b.Data[i] != float32(b.FirstSample+int64(i)) {
			panic("sample values do not match their sample numbers: a sample was invented")
		}
	}
	return nil
}
func (s *sink) End() error { s.ended = true; return nil }

func run(t *testing.T, cfg RunnerConfig) (*Runner, *sink) {
	t.Helper()
	s := &sink{}
	cfg.Consumers = append(cfg.Consumers, s)
	r, err := NewRunner(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	return r, s
}

func TestRunnerBackpressureLosesNothing(t *testing.T) {
	p, _ := NewPool(PoolSizeFor(2, false), 2, 10)
	defer p.Close(false)
	src := &counter{blocks: 50, skipAt: 20, word: func(s int64) uint64 { return uint64(s/7) & 1 }}
	r, s := run(t, RunnerConfig{Source: src, Pool: p, QueueDepth: 2, Backpressure: true,
		Stages: []Stage{slowStage{100 * time.Microsecond}}})
	st := r.Stats()
	if st.Blocks != 50 || st.Processed != 50 || st.OverrunBlocks != 0 || s.samples != 500 || !s.ended {
		t.Fatalf("stats %+v, consumed %d samples", st, s.samples)
	}
	if st.Gaps != 1 || st.GapSamples != 1000 {
		t.Fatalf("device gap not counted: %+v", st)
	}
	if s.events == 0 || uint64(s.events) != st.Events {
		t.Fatalf("events %d vs %d", s.events, st.Events)
	}
}

func TestRunnerOverrunLeavesGapNotFill(t *testing.T) {
	p, _ := NewPool(PoolSizeFor(2, false), 1, 10)
	defer p.Close(false)
	src := &counter{blocks: 60, pace: 100 * time.Microsecond}
	r, s := run(t, RunnerConfig{Source: src, Pool: p, QueueDepth: 2,
		Stages: []Stage{slowStage{5 * time.Millisecond}}})
	st := r.Stats()
	if st.OverrunBlocks == 0 {
		t.Fatalf("a stage 50× slower than the source caused no overrun: %+v", st)
	}
	if st.Processed+st.OverrunBlocks != 60 || uint64(s.samples) != st.Samples-st.OverrunSamples {
		t.Fatalf("blocks not accounted for: %+v consumed %d", st, s.samples)
	}
	// The consumer saw gaps in sample numbers, never duplicated or invented samples
	// (sink.Consume checks values against sample numbers).
	for i := 1; i < len(s.firsts); i++ {
		if s.firsts[i] <= s.firsts[i-1] || (s.firsts[i]-s.firsts[i-1])%10 != 0 {
			t.Fatalf("sample numbers %v", s.firsts)
		}
	}
}

func TestRunnerRecordingHooksAtBlockBoundaries(t *testing.T) {
	p, _ := NewPool(PoolSizeFor(4, false), 1, 10)
	defer p.Close(false)
	h := &hookStage{}
	rec := &Recording{Dir: "x", Experiment: 1, Number: 1}
	var r *Runner
	src := &counter{blocks: 6}
	wrapped := readerFunc(func(b *Block) error {
		switch src.n {
		case 2:
			r.StartRecording(rec)
		case 4:
			r.StopRecording()
		}
		return src.ReadBlock(b)
	})
	r, _ = NewRunner(RunnerConfig{Source: wrapped, Pool: p, Stages: []Stage{h}, Backpressure: true})
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	got := ""
	for _, s := range h.log {
		got += s + " "
	}
	want := "start_acq - - start_rec R R stop_rec - - stop_acq "
	if got != want {
		t.Fatalf("hooks:\n got %s\nwant %s", got, want)
	}
}

type readerFunc func(b *Block) error

func (f readerFunc) ReadBlock(b *Block) error { return f(b) }

func TestRunnerKeepRaw(t *testing.T) {
	p, _ := NewPool(PoolSizeFor(4, true), 1, 10)
	defer p.Close(false)
	double := stageFunc(func(b *Block) error {
		for i := range b.Data[:b.Samples] {
			b.Data[i] *= 2
		}
		return nil
	})
	checked := 0
	c := consumerFunc(func(b *Block) error {
		if b.Raw == nil || b.Raw.Data[3] != float32(b.FirstSample+3) || b.Data[3] != 2*b.Raw.Data[3] {
			t.Errorf("raw copy wrong at %d", b.FirstSample)
		}
		checked++
		return nil
	})
	r, err := NewRunner(RunnerConfig{Source: &counter{blocks: 20}, Pool: p, Stages: []Stage{double}, Consumers: []Consumer{c}, KeepRaw: true, QueueDepth: 4, Backpressure: true})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	if err := r.Wait(); err != nil || checked != 20 {
		t.Fatal(err, checked)
	}
	if p.Free() != p.Size() {
		t.Fatalf("blocks leaked: %d of %d free", p.Free(), p.Size())
	}
}

type stageFunc func(b *Block) error

func (f stageFunc) Name() string           { return "func" }
func (f stageFunc) Process(b *Block) error { return f(b) }

type consumerFunc func(b *Block) error

func (f consumerFunc) Consume(b *Block) error { return f(b) }
func (f consumerFunc) End() error             { return nil }

// BenchmarkHotPath measures the Go side of one block's trip: pool, source
// fill, edge detection, queues, stage loop, consumer, release. It must
// report 0 allocs/op.
func BenchmarkHotPath(b *testing.B) {
	const channels, samples = 32, 30
	p, _ := NewPool(PoolSizeFor(64, false), channels, samples)
	src := &counter{blocks: b.N, word: func(s int64) uint64 { return uint64(s/15000) & 1 }}
	r, _ := NewRunner(RunnerConfig{Source: src, Pool: p, QueueDepth: 64, Backpressure: true,
		Stages: []Stage{stageFunc(func(*Block) error { return nil })}, Consumers: []Consumer{consumerFunc(func(*Block) error { return nil })}})
	b.ReportAllocs()
	b.ResetTimer()
	r.Start()
	if err := r.Wait(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	p.Close(false)
}

type orderSink struct{ log *[]string }

func (s orderSink) HandleEvents(b *Block) error {
	for _, e := range b.Events {
		*s.log = append(*s.log, fmt.Sprintf("sink %d", e.Line))
	}
	return nil
}

// Events reach the outputs the moment the stage that made them returns:
// before the next stage runs, each exactly once.
func TestEventSinksGetEachStagesEventsAtOnce(t *testing.T) {
	p, _ := NewPool(PoolSizeFor(2, false), 1, 10)
	defer p.Close(false)
	var log []string
	emit := func(line uint8) Stage {
		return stageFunc(func(b *Block) error {
			log = append(log, fmt.Sprintf("stage %d", line))
			b.Events = append(b.Events, Event{Kind: EventTTL, Line: line, SampleNumber: b.FirstSample})
			return nil
		})
	}
	r, err := NewRunner(RunnerConfig{Source: &counter{blocks: 1}, Pool: p, QueueDepth: 2, Backpressure: true,
		Stages: []Stage{emit(1), emit(2)}, EventSinks: []EventSink{orderSink{&log}},
		ThreadSetup: func(string) func() { return func() {} }})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(log, ", "); got != "stage 1, sink 1, stage 2, sink 2" {
		t.Fatalf("order: %s", got)
	}
}

// Inline: the stage thread reads the source itself; nothing is lost, gaps
// the device reports are counted, hooks and order are as with queues.
func TestRunnerInline(t *testing.T) {
	p, _ := NewPool(PoolSizeFor(2, false), 2, 10)
	defer p.Close(false)
	h := &hookStage{}
	src := &counter{blocks: 30, skipAt: 10, word: func(s int64) uint64 { return uint64(s/7) & 1 }}
	r, s := run(t, RunnerConfig{Source: src, Pool: p, QueueDepth: 2, Inline: true, Stages: []Stage{h}})
	st := r.Stats()
	if st.Blocks != 30 || st.Processed != 30 || st.OverrunBlocks != 0 || s.samples != 300 || st.Gaps != 1 || st.Events == 0 {
		t.Fatalf("stats %+v, consumed %d", st, s.samples)
	}
	if h.log[0] != "start_acq" || h.log[len(h.log)-1] != "stop_acq" || len(h.log) != 32 {
		t.Fatalf("hooks %v", h.log)
	}
}

// A pool's memory is resident once NewPool returns (prefault), not mapped
// page by page as queues first reach each block.
func TestPoolMemoryIsResidentFromTheStart(t *testing.T) {
	rss := func() int64 {
		b, err := os.ReadFile("/proc/self/status")
		if err != nil {
			t.Skip("no /proc/self/status")
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				kb, _ := strconv.ParseInt(strings.Fields(l)[1], 10, 64)
				return kb << 10
			}
		}
		t.Skip("no VmRSS")
		return 0
	}
	before := rss()
	const blocks, channels, samples = 256, 512, 128 // 64 MiB of samples
	p, err := NewPool(blocks, channels, samples)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(false)
	grown := rss() - before
	if want := int64(blocks*channels*samples*4) * 9 / 10; grown < want {
		t.Fatalf("RSS grew %d MiB with a 64 MiB pool: its pages are not resident", grown>>20)
	}
}
