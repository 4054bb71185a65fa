package spikerbox

import (
	"testing"

	"github.com/ephysd/ephysd/drivers/spikerbox/spikerboxtest"
)

type parsed struct {
	values    []uint16
	events    []uint64
	skipped   []uint64
	msgs      []string
	discarded uint64
	resyncs   uint64
	p         *Parser
}

func parseSplit(data, cuts []byte, channels int) parsed {
	p := NewParser(channels, 10)
	var out parsed
	frame := func(f *Frame) {
		out.values = append(out.values, f.Values...)
		out.events = append(out.events, f.Events)
		out.skipped = append(out.skipped, f.Skipped)
	}
	msg := func(k, v []byte) { out.msgs = append(out.msgs, string(k)+"="+string(v)) }
	for i := 0; len(data) > 0; i++ {
		n := len(data)
		if len(cuts) > 0 {
			if n = min(n, int(cuts[i%len(cuts)])); n == 0 {
				p.Feed(data[:0], frame, msg)
				n = 1
			}
		}
		p.Feed(data[:n], frame, msg)
		data = data[n:]
	}
	out.discarded = p.Discarded
	out.resyncs = p.Resyncs
	out.p = p
	return out
}

func equal(a, b parsed) bool {
	if len(a.values) != len(b.values) || len(a.events) != len(b.events) || len(a.msgs) != len(b.msgs) ||
		a.discarded != b.discarded || a.resyncs != b.resyncs {
		return false
	}
	for i := range a.skipped {
		if a.skipped[i] != b.skipped[i] {
			return false
		}
	}
	for i := range a.values {
		if a.values[i] != b.values[i] {
			return false
		}
	}
	for i := range a.events {
		if a.events[i] != b.events[i] {
			return false
		}
	}
	for i := range a.msgs {
		if a.msgs[i] != b.msgs[i] {
			return false
		}
	}
	return true
}

func frames(n, channels int) []byte {
	var b []byte
	for k := 0; k < n; k++ {
		b = spikerboxtest.AppendFrame(b, k, channels)
	}
	return b
}

func TestParserMessagesAnywhere(t *testing.T) {
	data := frames(10, 2)
	var in []byte
	in = append(in, data[:9]...) // inside frame 2, after its first byte
	in = append(in, spikerboxtest.Message("EVNT:4;HWT:PLANTSS;")...)
	in = append(in, data[9:]...)
	in = append(in, 0xFF, 0xFF, 0xFF, 0x01, 0x01, 0x80, 0xFF, 'E', 'V', 'N', 'T', ':', '0', ';', 0xFF, 0xFF, 0x01, 0x01, 0x81, 0xFF)
	in = append(in, frames(1, 2)...)
	got := parseSplit(in, nil, 2)
	if len(got.values) != 22 || got.events[2] != 1<<4 || got.events[10] != 1 || len(got.msgs) != 3 || got.msgs[1] != "HWT=PLANTSS" {
		t.Fatalf("%+v", got)
	}
	for k := 0; k < 10; k++ {
		for c := 0; c < 2; c++ {
			if got.values[2*k+c] != spikerboxtest.FrameValue(k, c) {
				t.Fatalf("frame %d ch %d: %d", k, c, got.values[2*k+c])
			}
		}
	}
	if got.discarded != 1 { // the stray FF before the message start
		t.Fatalf("discarded %d", got.discarded)
	}
	for _, cuts := range [][]byte{{1}, {2, 5}, {7, 0}} {
		if s := parseSplit(in, cuts, 2); !equal(s, got) {
			t.Fatalf("cuts %v: %+v", cuts, s)
		}
	}
}

func TestParserAbandonsEndlessMessage(t *testing.T) {
	in := append([]byte{}, spikerboxtest.MessageStart...)
	in = append(in, make([]byte, MaxMessage+6)...)
	in = append(in, frames(3, 2)...)
	got := parseSplit(in, nil, 2)
	if len(got.values) != 6 {
		t.Fatalf("%d values after an endless message", len(got.values))
	}
}

// A message start whose end never comes (garbage, or an end lost) does not
// swallow the frames after it: they are parsed again once the message is
// abandoned, and only the start sequence is lost.
func TestParserReplaysAbandonedMessage(t *testing.T) {
	in := frames(1, 2)
	in = append(in, spikerboxtest.MessageStart...)
	data := frames(200, 2)
	in = append(in, data[4:]...) // frames 1..199: 796 bytes, far beyond MaxMessage
	got := parseSplit(in, nil, 2)
	if len(got.values) != 400 {
		t.Fatalf("%d frames, want all 200", len(got.values)/2)
	}
	for k := 0; k < 200; k++ {
		for c := 0; c < 2; c++ {
			if got.values[2*k+c] != spikerboxtest.FrameValue(k, c) {
				t.Fatalf("frame %d ch %d: %d", k, c, got.values[2*k+c])
			}
		}
	}
	// The 6 bytes of the false start are discarded; the frame after them
	// is taken to follow two lost samples (6 bytes, frames of 4).
	if got.discarded != 6 || got.resyncs != 1 || got.skipped[1] != 2 || got.p.Abandoned != 1 || got.p.Skipped != 2 {
		t.Fatalf("discarded %d, resyncs %d, skipped %v…, abandoned %d", got.discarded, got.resyncs, got.skipped[:3], got.p.Abandoned)
	}
	for _, cuts := range [][]byte{{1}, {3, 7}, {255, 1}} {
		if s := parseSplit(in, cuts, 2); !equal(s, got) {
			t.Fatalf("cuts %v differ", cuts)
		}
	}
}

func FuzzSpikerBoxParser(f *testing.F) {
	f.Add(frames(5, 2), []byte{3}, uint8(2))
	f.Add(append(spikerboxtest.Message("EVNT:3;"), frames(3, 1)...), []byte{1}, uint8(1))
	f.Add(append([]byte{0xFF, 0xFF, 0x01, 0x85, 0x00, 0x81}, frames(2, 3)...), []byte{}, uint8(3))
	f.Fuzz(func(t *testing.T, data, cuts []byte, channels uint8) {
		nch := 1 + int(channels)%MaxChannels
		whole := parseSplit(data, nil, nch)
		if len(whole.values) != nch*len(whole.events) {
			t.Fatalf("%d values in %d frames of %d channels", len(whole.values), len(whole.events), nch)
		}
		for _, v := range whole.values {
			if v >= 1024 {
				t.Fatalf("value %d out of 10 bits", v)
			}
		}
		if uint64(len(whole.values))*2 > uint64(len(data)) || whole.discarded > uint64(len(data)) {
			t.Fatalf("more out than in")
		}
		var skipped uint64
		for i, k := range whole.skipped {
			skipped += k
			if i == 0 && k != 0 {
				t.Fatalf("the first frame follows %d lost samples", k)
			}
		}
		if skipped != whole.p.Skipped || skipped > whole.discarded {
			t.Fatalf("%d samples skipped (parser: %d) for %d discarded bytes", skipped, whole.p.Skipped, whole.discarded)
		}
		if whole.resyncs > whole.discarded || (whole.discarded > 0) != (whole.resyncs > 0) || whole.resyncs > uint64(len(whole.events))+1 {
			t.Fatalf("%d resyncs for %d discarded bytes and %d frames", whole.resyncs, whole.discarded, len(whole.events))
		}
		if split := parseSplit(data, cuts, nch); !equal(split, whole) {
			t.Fatalf("cuts %v: split %+v whole %+v", cuts, split, whole)
		}
	})
}

func BenchmarkSpikerBoxParser(b *testing.B) {
	data := frames(10000, 2)
	data = append(data, spikerboxtest.Message("EVNT:1;")...)
	p := NewParser(2, 10)
	n := 0
	frame := func(*Frame) { n++ }
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p.Feed(data, frame, nil)
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "samples/s")
}

func pushBytes(s *Source, data []byte) {
	s.queue.Lock()
	s.parser.Feed(data, s.frameFn, s.msgFn)
	s.queue.Unlock()
	s.queue.Wake()
}

func newUnstarted(t testing.TB) *Source {
	fake := spikerboxtest.Start(t, spikerboxtest.Options{})
	cfg := config(fake.Path(), nil)
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	s := src.(*Source)
	t.Cleanup(func() { s.Close() })
	s.started = true // bytes come from pushBytes, not the port
	return s
}

// BenchmarkReadBlock measures bytes → parser → ring → ReadBlock in steady
// state, 10 samples (1 ms at 10 kHz) per block, with an event every block.
func BenchmarkReadBlock(b *testing.B) {
	s := newUnstarted(b)
	blk := newBlock(b, 2, 10)
	chunk := append(spikerboxtest.Message("EVNT:2;"), frames(10, 2)...)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for i := 0; i < b.N; i++ {
		pushBytes(s, chunk)
		blk.Reset()
		if err := s.ReadBlock(blk); err != nil {
			b.Fatal(err)
		}
		n += blk.Samples
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "samples/s")
}

func TestReadBlockDoesNotAllocate(t *testing.T) {
	s := newUnstarted(t)
	blk := newBlock(t, 2, 10)
	chunk := append(spikerboxtest.Message("EVNT:2;"), frames(10, 2)...)
	allocs := testing.AllocsPerRun(200, func() {
		pushBytes(s, chunk)
		blk.Reset()
		if err := s.ReadBlock(blk); err != nil || blk.Samples != 10 {
			t.Fatal(err, blk.Samples)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per block", allocs)
	}
}
