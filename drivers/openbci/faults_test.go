package openbci

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/hanguptest"
	"github.com/ephysd/ephysd/drivers/openbci/openbcitest"
)

// The dongle is pulled out and plugged in again, 20 times (100 with
// EPHYSD_LONG_TESTS=1), while the Cyton streams through the
// ReopeningSource the daemon uses: each hang-up is logged and counted,
// the dongle reopened at its /dev/serial/by-id link, the time away is one
// gap in sample numbers, every sample read is the one the board sent, and
// no goroutine or file descriptor is left behind.
func TestHangUps(t *testing.T) {
	link := filepath.Join(t.TempDir(), "serial", "by-id", "usb-FTDI_FT231X_USB_UART_DM00Q0QN-if00-port0")
	gains := []int{24, 24, 24, 24, 24, 24, 24, 24}
	res := hanguptest.RunSource(t, hanguptest.Source{
		Name: "openbci dongle",
		Rate: 250,
		Plug: func(int) func() {
			return openbcitest.Start(t, openbcitest.Options{Link: link}).Close
		},
		Open: func() (drivers.Source, error) {
			c := config(link, nil)
			return c.Open()
		},
		Check: func(k int64, v []float32, dig uint64) error {
			for c, g := range gains {
				if want := uv(openbcitest.SampleCounts(int(k), c), g); v[c] != want {
					return fmt.Errorf("CH%d = %v µV, the board sent %v", c+1, v[c], want)
				}
			}
			a := openbcitest.HeldAccel(int(k))
			for i := range a {
				if want := float32(float64(a[i]) * AccelScale); v[8+i] != want {
					return fmt.Errorf("accelerometer %d = %v g, the board sent %v", i, v[8+i], want)
				}
			}
			if dig != 0 {
				return fmt.Errorf("digital word %x", dig)
			}
			return nil
		},
		Samples: 25,
		HangUps: hanguptest.Count(20, 100),
	})
	t.Logf("%d hang-ups survived, %d samples checked, gaps %v samples", len(res.Gaps), res.Samples, res.Gaps)
}

// ambiguous reports whether a candidate packet starting at an A0 inside
// the first damaged bytes of s has a stop byte C0–C6: damage the Cyton's
// protocol (no checksum) cannot tell from a packet. The garbage test does
// not make such damage; TestResyncAfterGarbage tries the cases the parser
// does resolve.
func ambiguous(s []byte, damaged int) bool {
	for p := 0; p < damaged; p++ {
		if s[p] == StartByte && p+PacketLen-1 < len(s) {
			if stop := s[p+PacketLen-1]; stop >= StopByteMin && stop <= StopByteMax {
				return true
			}
		}
	}
	return false
}

// faultKind is one way the garbage test damages the stream.
type faultKind int

const (
	garbageBefore faultKind = iota // random bytes before a packet
	truncated                      // a packet cut short
	badStop                        // a packet whose stop byte is not C0–C6
	badStart                       // a packet whose A0 was corrupted
)

// Random garbage, truncated packets and corrupted start and stop bytes are
// injected into a running stream through the fake dongle. The parser
// finds the next good packet every time; a packet that was damaged is a
// gap of one sample, garbage between packets loses none; the discarded
// bytes and the resynchronisations are counted exactly; every sample is
// the one the board sent.
func TestGarbageAtRunTime(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Rate: 2000})
	s := open(t, fake, func(c *Config) { c.Accelerometer = false })
	r := rand.New(rand.NewPCG(6, 3))
	stream := func(k, n int) []byte { // packets k… as sent
		var b []byte
		for j := k; j < k+n; j++ {
			b = openbcitest.AppendPacket(b, j, false, 0)
		}
		return b
	}
	const tries = 60
	var faults, skipped int
	var damagedBytes uint64
	lost := map[int]bool{}
	kinds := map[faultKind]int{}
	last := 0
	fake.WaitSent(t, 10, 5*time.Second) // damage in a running stream, not before its first packet
	for i := 0; i < tries; i++ {
		kind := faultKind(i % 4)
		// damaged is set by the fake's goroutine before it counts the
		// packet as sent (under its lock), read here after WaitSent.
		damaged := -1
		k := fake.Inject(func(k int, pkt []byte) []byte {
			next := stream(k+1, 2)
			for try := 0; try < 100; try++ {
				var out []byte
				var n int
				switch kind {
				case garbageBefore:
					g := make([]byte, 1+r.IntN(200))
					for j := range g {
						g[j] = byte(r.UintN(256))
					}
					out, n = append(g, pkt...), len(g)
				case truncated:
					out = append([]byte{}, pkt[:1+r.IntN(PacketLen-1)]...)
					n = len(out)
				case badStop:
					out = append([]byte{}, pkt...)
					for out[PacketLen-1] >= StopByteMin && out[PacketLen-1] <= StopByteMax {
						out[PacketLen-1] = byte(r.UintN(256))
					}
					n = PacketLen
				case badStart:
					out = append([]byte{}, pkt...)
					for out[0] == StartByte {
						out[0] = byte(r.UintN(256))
					}
					n = PacketLen
				}
				if !ambiguous(append(out, next...), n) {
					damaged = n
					return out
				}
			}
			// This packet (and the next) leave no room for this kind of
			// damage that the protocol can resolve: send it whole.
			return pkt
		})
		fake.WaitSent(t, k+4, 5*time.Second) // the next fault three packets later at the earliest
		last = k
		if damaged < 0 {
			skipped++
			continue
		}
		faults++
		damagedBytes += uint64(damaged)
		if kind != garbageBefore {
			lost[k] = true
		}
		kinds[kind]++
	}
	if faults < tries*3/4 {
		t.Fatalf("only %d of %d faults could be injected", faults, tries)
	}
	end := last + 10
	fake.WaitSent(t, end+1, 5*time.Second)

	b := newBlock(t, 8, 16)
	seen := map[int64]bool{}
	var max int64 = -1
	deadline := time.Now().Add(10 * time.Second)
	for max < int64(end) {
		if time.Now().After(deadline) {
			t.Fatalf("samples up to %d only, want %d", max, end)
		}
		b.Reset()
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < b.Samples; i++ {
			sn := b.FirstSample + int64(i)
			if seen[sn] || sn <= max {
				t.Fatalf("sample %d twice or out of order", sn)
			}
			seen[sn], max = true, sn
			for c := 0; c < 8; c++ {
				if want := uv(openbcitest.SampleCounts(int(sn), c), 24); b.Data[c*b.Samples+i] != want {
					t.Fatalf("sample %d CH%d = %v µV, the board sent %v", sn, c+1, b.Data[c*b.Samples+i], want)
				}
			}
		}
	}
	for sn := int64(0); sn <= max; sn++ {
		if seen[sn] == lost[int(sn)] {
			t.Fatalf("sample %d: read %v, damaged %v", sn, seen[sn], lost[int(sn)])
		}
	}
	st := s.Stats()
	if st.DiscardedBytes != damagedBytes || st.Resyncs != uint64(faults) || st.LostPackets != uint64(len(lost)) ||
		st.Gaps != uint64(len(lost)) || st.LostSamples != uint64(len(lost)) {
		t.Fatalf("stats %+v; injected %d damaged bytes in %d faults, %d packets destroyed", st, damagedBytes, faults, len(lost))
	}
	if ls := s.LinkStats(); ls.DiscardedBytes != damagedBytes || ls.Resyncs != uint64(faults) {
		t.Fatalf("link stats %+v", ls)
	}
	t.Logf("%d faults (%d garbage bursts, %d truncated, %d bad stop, %d bad start; %d skipped as unresolvable): %d bytes injected, %d discarded, %d resyncs; %d packets destroyed, %d samples lost",
		faults, kinds[garbageBefore], kinds[truncated], kinds[badStop], kinds[badStart], skipped, damagedBytes, st.DiscardedBytes, st.Resyncs, len(lost), st.LostSamples)
}
