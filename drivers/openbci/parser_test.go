package openbci

import (
	"bytes"
	"math"
	"testing"

	"github.com/ephysd/ephysd/drivers/openbci/openbcitest"
	"github.com/ephysd/ephysd/pipeline"
)

type parsed struct {
	pkts      []Packet
	discarded uint64
	resyncs   uint64
	pending   int
}

// parseSplit feeds data in chunks whose lengths come from cuts.
func parseSplit(data, cuts []byte) parsed {
	var p Parser
	var out parsed
	emit := func(pk *Packet) { out.pkts = append(out.pkts, *pk) }
	for i := 0; len(data) > 0; i++ {
		n := len(data)
		if len(cuts) > 0 {
			n = min(n, int(cuts[i%len(cuts)]))
			if n == 0 { // an empty feed, then one byte
				p.Feed(data[:0], emit)
				n = 1
			}
		}
		p.Feed(data[:n], emit)
		data = data[n:]
	}
	out.discarded = p.Discarded
	out.resyncs = p.Resyncs
	out.pending = p.n
	return out
}

func stream(first, n int, daisy bool) []byte {
	var b []byte
	for k := first; k < first+n; k++ {
		b = openbcitest.AppendPacket(b, k, daisy, 0)
	}
	return b
}

func TestParserPacketsExact(t *testing.T) {
	data := stream(0, 300, false)
	got := parseSplit(data, nil)
	// The last packet has its counter confirmed, so all 300 come out.
	if len(got.pkts) != 300 || got.discarded != 0 {
		t.Fatalf("%d packets, %d discarded", len(got.pkts), got.discarded)
	}
	for k, p := range got.pkts {
		if p.SampleNumber != byte(k) || p.Stop != 0xC0 {
			t.Fatalf("packet %d: %+v", k, p)
		}
		for c := 0; c < 8; c++ {
			if p.Counts[c] != openbcitest.SampleCounts(k, c) {
				t.Fatalf("packet %d ch %d: %d want %d", k, c, p.Counts[c], openbcitest.SampleCounts(k, c))
			}
		}
	}
}

func TestParserSignExtension(t *testing.T) {
	pkt := []byte{0xA0, 7, 0x80, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 1, 0xA0, 0xC0, 0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 0xC1}
	var got []Packet
	var p Parser
	p.Feed(append(pkt, 0xA0), func(pk *Packet) { got = append(got, *pk) })
	if len(got) != 1 {
		t.Fatalf("%d packets", len(got))
	}
	want := [8]int32{-1 << 23, 1<<23 - 1, -1, 1, -0x5F3F60, 0, 0, 0}
	if got[0].Counts != want || got[0].Stop != 0xC1 || got[0].Aux != [6]byte{0x12, 0x34, 0, 0, 0, 0} {
		t.Fatalf("got %+v want counts %v", got[0], want)
	}
}

func TestParserSplitsAgree(t *testing.T) {
	data := stream(0, 50, true)
	data = append(append(append([]byte{}, data[:100]...), 0xA0, 0xC0, 0xA0, 0x01), data[100:]...)
	whole := parseSplit(data, nil)
	for _, cuts := range [][]byte{{1}, {2, 31}, {33}, {34}, {7, 0, 200}} {
		got := parseSplit(data, cuts)
		if !samePackets(got.pkts, whole.pkts) || got.discarded != whole.discarded {
			t.Fatalf("cuts %v: %d packets, %d discarded; whole: %d, %d", cuts, len(got.pkts), got.discarded, len(whole.pkts), whole.discarded)
		}
	}
}

func samePackets(a, b []Packet) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func FuzzCytonParser(f *testing.F) {
	f.Add(stream(0, 4, false), []byte{1})
	f.Add(stream(250, 12, true), []byte{5, 33})
	f.Add(append([]byte{0xA0, 0xC0, 0xA0, 0xA0, 0xC6}, stream(3, 3, false)...), []byte{})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		whole := parseSplit(data, nil)
		if whole.discarded+uint64(PacketLen*len(whole.pkts))+uint64(whole.pending) != uint64(len(data)) {
			t.Fatalf("bytes unaccounted: %d discarded + %d packets + %d pending != %d", whole.discarded, len(whole.pkts), whole.pending, len(data))
		}
		for _, p := range whole.pkts {
			if p.Stop < StopByteMin || p.Stop > StopByteMax {
				t.Fatalf("stop byte %x", p.Stop)
			}
			for _, c := range p.Counts {
				if c < -1<<23 || c >= 1<<23 {
					t.Fatalf("count %d out of int24", c)
				}
			}
		}
		if whole.resyncs > whole.discarded || whole.resyncs > uint64(len(whole.pkts))+1 || (whole.discarded > 0) != (whole.resyncs > 0) {
			t.Fatalf("%d resyncs for %d discarded bytes and %d packets", whole.resyncs, whole.discarded, len(whole.pkts))
		}
		split := parseSplit(data, cuts)
		if !samePackets(split.pkts, whole.pkts) || split.discarded != whole.discarded || split.resyncs != whole.resyncs || split.pending != whole.pending {
			t.Fatalf("cuts %v: %d packets / %d discarded, whole %d / %d", cuts, len(split.pkts), split.discarded, len(whole.pkts), whole.discarded)
		}
		for _, daisy := range []bool{false, true} {
			d := NewDecoder(daisy, true, []int{1, 2, 4, 6, 8, 12, 24, 24, 1, 2, 4, 6, 8, 12, 24, 24}[:8+8*b2i(daisy)])
			last := int64(-1)
			for i := range whole.pkts {
				d.Add(&whole.pkts[i], func(sn int64, v []float32) {
					if len(v) != d.Channels() || len(v) != 8+8*b2i(daisy)+3 {
						t.Fatalf("sample of %d values", len(v))
					}
					if sn <= last {
						t.Fatalf("sample number %d after %d", sn, last)
					}
					last = sn
					for c, x := range v {
						lim := 4.5e6 * 1.0001
						if c >= len(v)-3 {
							lim = 4.096 * 1.0001
						}
						if math.IsNaN(float64(x)) || math.Abs(float64(x)) > lim {
							t.Fatalf("value %v on channel %d", x, c)
						}
					}
				})
			}
			st := d.Stats
			if st.Samples > st.Packets || (!daisy && st.Samples+st.Duplicates != st.Packets) {
				t.Fatalf("stats %+v", st)
			}
		}
	})
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// BenchmarkCytonParser measures the parser and decoder on a clean stream.
func BenchmarkCytonParser(b *testing.B) {
	data := stream(0, 2560, false)
	var p Parser
	d := NewDecoder(false, true, nil)
	samples := 0
	onSample := func(int64, []float32) { samples++ }
	onPacket := func(pk *Packet) { d.Add(pk, onSample) }
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p.Feed(data, onPacket)
	}
	b.ReportMetric(float64(samples)/b.Elapsed().Seconds(), "samples/s")
}

// BenchmarkCytonParserResync measures the slow path: garbage between packets.
func BenchmarkCytonParserResync(b *testing.B) {
	var data []byte
	for k := 0; k < 256; k++ {
		data = append(data, 0x11, 0xA0, 0x00)
		data = openbcitest.AppendPacket(data, k, false, 0)
	}
	var p Parser
	packets := 0
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p.Feed(data, func(*Packet) { packets++ })
	}
	b.ReportMetric(float64(packets)/b.Elapsed().Seconds(), "samples/s")
}

// pushBytes feeds the source's parser as its reader goroutine does.
func pushBytes(s *Source, data []byte) {
	s.queue.Lock()
	s.parser.Feed(data, s.packetFn)
	s.queue.Unlock()
	s.queue.Wake()
}

func newUnstarted(t testing.TB, daisy bool) *Source {
	fake := openbcitest.Start(t, openbcitest.Options{Daisy: daisy})
	cfg := config(fake.Path(), func(c *Config) { c.Daisy = daisy })
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
// state (no port: serialport's Read is tested on its own).
func BenchmarkReadBlock(b *testing.B) {
	s := newUnstarted(b, false)
	blk := newBlock(b, len(s.Info().Channels), 8)
	data := stream(0, 256*8, false)
	pos := 0
	b.ReportAllocs()
	b.ResetTimer()
	samples := 0
	for i := 0; i < b.N; i++ {
		pushBytes(s, data[pos:pos+8*PacketLen])
		if pos += 8 * PacketLen; pos == len(data) {
			pos = 0
		}
		blk.Reset()
		if err := s.ReadBlock(blk); err != nil {
			b.Fatal(err)
		}
		samples += blk.Samples
	}
	b.SetBytes(8 * PacketLen)
	b.ReportMetric(float64(samples)/b.Elapsed().Seconds(), "samples/s")
}

func TestReadBlockDoesNotAllocate(t *testing.T) {
	s := newUnstarted(t, true)
	blk := newBlock(t, len(s.Info().Channels), 4)
	data := stream(0, 512, true)
	pushBytes(s, data[:2*PacketLen])
	pos := 2 * PacketLen
	allocs := testing.AllocsPerRun(200, func() {
		pushBytes(s, data[pos:pos+2*PacketLen])
		if pos += 2 * PacketLen; pos == len(data) {
			pos = 0
		}
		blk.Reset()
		if err := s.ReadBlock(blk); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per block", allocs)
	}
	_ = bytes.MinRead
	_ = pipeline.DefaultEventCapacity
}
