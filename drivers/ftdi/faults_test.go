package ftdi

import (
	"bytes"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/ftdi/ftditest"
)

func FuzzSplitPackets(f *testing.F) {
	f.Add([]byte{0x31, 0x60, 1, 2, 3}, uint16(64))
	f.Add(append(bytes.Repeat([]byte{0x31, 0x60, 7}, 30), 0x31), uint16(5))
	f.Add([]byte{0x31}, uint16(0))
	f.Fuzz(func(t *testing.T, raw []byte, mps uint16) {
		out, bad, badBytes := SplitPackets(nil, raw, int(mps))
		size := int(mps)
		if size <= 2 {
			size = 64
		}
		var want []byte
		wantBad, wantBadBytes := 0, 0
		for i := 0; i < len(raw); i += size {
			chunk := raw[i:min(len(raw), i+size)]
			if len(chunk) < 2 {
				wantBad++
				wantBadBytes += len(chunk)
				continue
			}
			want = append(want, chunk[2:]...)
		}
		if !bytes.Equal(out, want) || bad != wantBad || badBytes != wantBadBytes || bad > 1 {
			t.Fatalf("packets of %d: % x → % x, %d malformed (%d bytes); want % x, %d (%d)", size, raw, out, bad, badBytes, want, wantBad, wantBadBytes)
		}
		if got := StripModemStatus(nil, raw, int(mps)); !bytes.Equal(got, out) {
			t.Fatalf("StripModemStatus and SplitPackets disagree")
		}
	})
}

// Damaged bulk IN transfers in sync bitbang mode — a packet too short for
// its status bytes, alone or after a good packet — are counted and dropped
// (SplitPackets keeps the good packets' samples: FuzzSplitPackets), and
// the samples after them are used.
func TestMalformedPackets(t *testing.T) {
	fake := ftditest.New()
	fake.MaxPacket = 64
	fake.SetInputs(0x11)
	cfg := DefaultInputConfig()
	cfg.Mode = "sync"
	in, err := OpenInput(&ftditest.Opener{Dev: fake}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if err := in.Start(); err != nil {
		t.Fatal(err)
	}
	waitLines := func(want uint64) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for w, _ := in.Lines(); w != want; w, _ = in.Lines() {
			if time.Now().After(deadline) || in.Err() != nil {
				t.Fatalf("Lines = %#x (err %v), want %#x", w, in.Err(), want)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitLines(0x11)
	// A good packet of 62 samples, then one stray byte; then a transfer
	// of a single byte.
	good := append([]byte{0x31, 0x60}, bytes.Repeat([]byte{0x77}, 62)...)
	fake.QueueRawIn(append(good, 0x31))
	fake.QueueRawIn([]byte{0x60})
	deadline := time.Now().Add(2 * time.Second)
	for in.LinkStats().Resyncs < 2 {
		if time.Now().After(deadline) || in.Err() != nil {
			t.Fatalf("link stats %+v (err %v)", in.LinkStats(), in.Err())
		}
		time.Sleep(time.Millisecond)
	}
	fake.SetInputs(0x5A)
	waitLines(0x5A)
	if ls := in.LinkStats(); ls.DiscardedBytes != 2 || ls.Resyncs != 2 {
		t.Fatalf("link stats %+v, want 2 malformed packets of 1 byte", ls)
	}
}
