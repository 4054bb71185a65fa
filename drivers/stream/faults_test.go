package stream_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/hanguptest"
	"github.com/ephysd/ephysd/drivers/serialport/ptytest"
	"github.com/ephysd/ephysd/drivers/stream"
	"github.com/ephysd/ephysd/drivers/stream/streamdev"
)

// smallAnnounce is a 4-channel int16 headstage with an 8-line digital
// word and frames of 10 samples.
func smallAnnounce(rateHz uint32) stream.Announce {
	a := streamdev.DefaultAnnounce()
	a.Channels, a.DigitalBytes, a.MaxSamples, a.RateMilliHz = 4, 1, 10, rateHz*1000
	return a
}

// checkSample compares sample k of a Pattern device with what was read.
func checkSample(a stream.Announce, k int64, v []float32, dig uint64) error {
	for c := 0; c < a.Channels; c++ {
		if want := float32(streamdev.PatternValue(uint64(k), c)) * a.Scale(c); v[c] != want {
			return fmt.Errorf("channel %d = %g, the device sent %g", c, v[c], want)
		}
	}
	if want := streamdev.PatternDigital(uint64(k)) & 0xFF; dig != want {
		return fmt.Errorf("digital word %#x, the device sent %#x", dig, want)
	}
	return nil
}

// A headstage on a CDC-ACM serial port is pulled out and plugged in again
// 20 times (100 with EPHYSD_LONG_TESTS=1) while it streams in real time:
// each hang-up is logged and counted, the device reopened (handshake and
// all) at its link, the time away one gap in sample numbers, every sample
// the device's, and no goroutine or descriptor left behind.
func TestHangUpsOnSerial(t *testing.T) {
	link := filepath.Join(t.TempDir(), "serial", "by-id", "usb-ephysd_stream_headstage_SD0001-if00")
	a := smallAnnounce(2000)
	res := hanguptest.RunSource(t, hanguptest.Source{
		Name: "stream headstage",
		Rate: a.Rate(),
		Plug: func(int) func() {
			d, err := streamdev.New(streamdev.Config{Announce: a, Realtime: true, Generate: streamdev.Pattern(a)})
			if err != nil {
				t.Fatal(err)
			}
			p := ptytest.NewAt(t, link)
			p.ReleaseSlave()
			if err := d.Go(p.Conn()); err != nil {
				t.Fatal(err)
			}
			return d.Unplug
		},
		Open: func() (drivers.Source, error) {
			c := stream.DefaultConfig()
			c.Path, c.TimeoutMS = link, 2000
			return c.Open()
		},
		Check: func(k int64, v []float32, dig uint64) error {
			return checkSample(a, k, v, dig)
		},
		BlockSamples: 20,
		Samples:      100,
		HangUps:      hanguptest.Count(20, 100),
	})
	t.Logf("%d hang-ups survived, %d samples checked, gaps %v samples", len(res.Gaps), res.Samples, res.Gaps)
}

// waitFrames waits until the device has made n DATA frames.
func waitFrames(t *testing.T, d *streamdev.Device, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for d.Frames() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the device made %d frames, not %d, within 5 s", d.Frames(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// Random garbage, truncated frames, corrupted CRCs, sync words and
// headers, and dropped frames are injected into a running stream on a
// serial port. The decoder finds the next good frame every time; a frame
// that was damaged or dropped is a gap of exactly its samples, garbage
// loses nothing; discarded bytes, bad frames and resyncs are counted
// exactly; every sample is the device's.
func TestGarbageAtRunTime(t *testing.T) {
	a := smallAnnounce(20000)
	d := newDevice(t, streamdev.Config{Announce: a, Realtime: true, Generate: streamdev.Pattern(a)})
	s := open(t, onPTY(t, d))
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	frameLen := a.Layout().MaxFrame()
	r := rand.New(rand.NewPCG(2, 7))
	kinds := []streamdev.FaultKind{streamdev.Garbage, streamdev.Truncate, streamdev.CorruptCRC, streamdev.CorruptSync, streamdev.CorruptHeader, streamdev.Drop}
	names := []string{"garbage bursts", "truncated", "bad CRC", "bad sync", "bad header", "dropped"}
	count := make([]int, len(kinds))
	lost := map[int]bool{}
	var discarded, resyncs, bad uint64

	// The driver reads the port only in ReadBlock: read all along, as the
	// pipeline does, or the device would block on a full tty buffer.
	b := newBlock(t, a.Channels, 25)
	seen := map[int64]bool{}
	max := int64(-1)
	var end atomic.Int64
	end.Store(math.MaxInt64)
	readErr := make(chan error, 1)
	go func() {
		vals := make([]float32, a.Channels)
		for max < end.Load() {
			b.Reset()
			if err := s.ReadBlock(b); err != nil {
				readErr <- err
				return
			}
			for i := 0; i < b.Samples; i++ {
				sn := b.FirstSample + int64(i)
				if sn <= max {
					readErr <- fmt.Errorf("sample %d after %d", sn, max)
					return
				}
				seen[sn], max = true, sn
				for c := range vals {
					vals[c] = b.Data[c*b.Samples+i]
				}
				if err := checkSample(a, sn, vals, b.Digital[i]); err != nil {
					readErr <- fmt.Errorf("sample %d: %v", sn, err)
					return
				}
			}
		}
		readErr <- nil
	}()
	waitFrames(t, d, 10)
	const faults = 60
	last := 0
	for i := 0; i < faults; i++ {
		f := streamdev.Fault{Kind: kinds[i%len(kinds)]}
		switch f.Kind {
		case streamdev.Garbage:
			f.Bytes = make([]byte, 1+r.IntN(200))
			for j := range f.Bytes {
				f.Bytes[j] = byte(r.UintN(256))
			}
			discarded += uint64(len(f.Bytes))
		case streamdev.Truncate:
			f.N = 1 + r.IntN(frameLen-1)
			discarded += uint64(f.N)
			if f.N >= stream.HeaderSize { // a good header: the CRC fails
				bad++
			}
		case streamdev.CorruptCRC:
			discarded += uint64(frameLen)
			bad++
		case streamdev.CorruptSync, streamdev.CorruptHeader:
			discarded += uint64(frameLen)
		}
		if f.Kind != streamdev.Drop {
			resyncs++
		}
		k := d.Inject(f)
		if f.Kind != streamdev.Garbage {
			lost[k] = true
		}
		count[i%len(kinds)]++
		waitFrames(t, d, k+4)
		last = k
	}
	end.Store(int64(last+10) * int64(a.MaxSamples))
	select {
	case err := <-readErr:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		s.Stop()
		<-readErr
		t.Fatalf("samples up to %d only within 10 s, want %d", max, end.Load())
	}
	for sn := int64(0); sn <= max; sn++ {
		if seen[sn] == lost[int(sn)/a.MaxSamples] {
			t.Fatalf("sample %d (frame %d): read %v, destroyed %v", sn, sn/int64(a.MaxSamples), seen[sn], lost[int(sn)/a.MaxSamples])
		}
	}
	st := s.Stats()
	if st.DiscardedBytes != discarded || st.Resyncs != resyncs || st.BadFrames != bad ||
		st.Gaps != uint64(len(lost)) || st.MissingSamples != uint64(len(lost)*a.MaxSamples) {
		t.Fatalf("stats %+v; want %d discarded bytes, %d resyncs, %d bad frames, %d gaps of %d samples", st, discarded, resyncs, bad, len(lost), a.MaxSamples)
	}
	if ls := s.LinkStats(); ls.DiscardedBytes != discarded || ls.Resyncs != resyncs {
		t.Fatalf("link stats %+v", ls)
	}
	msg := fmt.Sprintf("%d faults (", faults)
	for i, n := range names {
		msg += fmt.Sprintf("%d %s, ", count[i], n)
	}
	t.Logf("%s): %d bytes discarded (as injected), %d resyncs, %d bad frames; %d frames destroyed, %d samples missing",
		msg[:len(msg)-2], st.DiscardedBytes, st.Resyncs, st.BadFrames, len(lost), st.MissingSamples)
}
