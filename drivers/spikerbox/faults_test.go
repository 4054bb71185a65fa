package spikerbox

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/hanguptest"
	"github.com/ephysd/ephysd/drivers/spikerbox/spikerboxtest"
)

// The box is pulled out and plugged in again 20 times (100 with
// EPHYSD_LONG_TESTS=1) while it streams at 10 kHz through the daemon's
// ReopeningSource: each hang-up is logged and counted, the box reopened at
// its link, the time away one gap in sample numbers, every sample the
// box's, and no goroutine or descriptor left behind.
func TestHangUps(t *testing.T) {
	link := filepath.Join(t.TempDir(), "serial", "by-id", "usb-Backyard_Brains_Neuron_SpikerBox_Pro-if00")
	res := hanguptest.RunSource(t, hanguptest.Source{
		Name: "spikerbox",
		Rate: 10000,
		Plug: func(int) func() {
			return spikerboxtest.Start(t, spikerboxtest.Options{Link: link}).Close
		},
		Open: func() (drivers.Source, error) {
			c := config(link, nil)
			return c.Open()
		},
		Check: func(k int64, v []float32, dig uint64) error {
			for c := 0; c < 2; c++ {
				if want := float32(spikerboxtest.FrameValue(int(k), c)) - 512; v[c] != want {
					return fmt.Errorf("CH%d = %v, the box sent %v", c+1, v[c], want)
				}
			}
			if dig != 0 {
				return fmt.Errorf("digital word %x without events", dig)
			}
			return nil
		},
		BlockSamples: 100,
		Samples:      500,
		HangUps:      hanguptest.Count(20, 100),
	})
	t.Logf("%d hang-ups survived, %d samples checked, gaps %v samples", len(res.Gaps), res.Samples, res.Gaps)
}

// frameShaped reports whether garbage holds a whole frame of 2 channels
// (a start byte, then three bytes that fit) or a message start: bytes the
// protocol, which has no checksum, cannot tell from the box's own.
func frameShaped(g []byte) bool {
	if bytes.Contains(g, spikerboxtest.MessageStart) {
		return true
	}
	for i := 0; i+3 < len(g); i++ {
		if g[i]&0x80 != 0 && g[i]&0x7F <= 7 && g[i+1] < 0x80 && g[i+2] <= 7 && g[i+3] < 0x80 {
			return true
		}
	}
	return false
}

// Random garbage, frames cut short, frame starts lost and bytes corrupted
// are injected into the running stream through the fake box. Every good
// frame after the damage is found again with its exact values; a damaged
// frame is one lost sample (a gap of one), garbage a gap of as many
// samples as its bytes would fill; discarded bytes and resyncs are counted
// exactly.
func TestGarbageAtRunTime(t *testing.T) {
	fake := spikerboxtest.Start(t, spikerboxtest.Options{})
	s := open(t, fake, nil)
	r := rand.New(rand.NewPCG(5, 9))
	const faults = 60
	var damagedBytes, skips uint64
	lost := map[int]bool{}
	shift := map[int]int64{} // garbage before frame k: the samples it is taken for
	kinds := make([]int, 5)
	last := 0
	fake.WaitSent(t, 10, 5*time.Second) // damage in a running stream, not before its first frame
	for i := 0; i < faults; i++ {
		kind := i % 5
		damaged := 0
		k := fake.Inject(func(k int, fr []byte) []byte {
			switch kind {
			case 0: // garbage before the frame
				for {
					g := make([]byte, 1+r.IntN(200))
					for j := range g {
						g[j] = byte(r.UintN(256))
					}
					if !frameShaped(g) {
						damaged = len(g)
						return append(g, fr...)
					}
				}
			case 1: // cut short
				fr = fr[:1+r.IntN(3)]
			case 2: // the frame start lost its flag
				fr[0] &^= 0x80
			case 3: // a low byte got the flag
				fr[1+2*r.IntN(2)] |= 0x80
			case 4: // a high byte out of range
				fr[2] = 8 + byte(r.IntN(0x78))
			}
			damaged = len(fr)
			return fr
		})
		fake.WaitSent(t, k+4, 5*time.Second)
		damagedBytes += uint64(damaged)
		if kind == 0 {
			shift[k] = int64(damaged+3) / 4
			skips += uint64(shift[k])
		} else {
			lost[k] = true
			skips++
		}
		kinds[kind]++
		last = k
	}
	end := last + 10
	fake.WaitSent(t, end+1, 5*time.Second)

	var want []int64 // sample numbers of the frames 0..end that arrive
	var frame []int
	var sh int64
	for j := 0; j <= end; j++ {
		sh += shift[j]
		if !lost[j] {
			want = append(want, int64(j)+sh)
			frame = append(frame, j)
		}
	}
	got := read(t, s, 16, len(want))
	for i, g := range got {
		if g.sn != want[i] {
			t.Fatalf("frame %d: sample number %d, want %d", frame[i], g.sn, want[i])
		}
		for c := 0; c < 2; c++ {
			if w := float32(spikerboxtest.FrameValue(frame[i], c)) - 512; g.vals[c] != w {
				t.Fatalf("frame %d CH%d = %v, the box sent %v", frame[i], c+1, g.vals[c], w)
			}
		}
	}
	st := s.Stats()
	if st.DiscardedBytes != damagedBytes || st.Resyncs != faults || st.Gaps != faults || st.LostSamples != skips {
		t.Fatalf("stats %+v; injected %d damaged bytes in %d faults, %d samples to skip", st, damagedBytes, faults, skips)
	}
	if ls := s.LinkStats(); ls.DiscardedBytes != damagedBytes || ls.Resyncs != faults {
		t.Fatalf("link stats %+v", ls)
	}
	t.Logf("%d faults (%d garbage bursts, %d cut short, %d lost start, %d flagged low byte, %d high byte out of range): %d bytes injected, %d discarded, %d resyncs; %d frames destroyed, %d sample numbers skipped",
		faults, kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], damagedBytes, st.DiscardedBytes, st.Resyncs, len(lost), st.LostSamples)
}
