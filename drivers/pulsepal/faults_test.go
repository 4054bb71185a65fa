package pulsepal

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/hanguptest"
	"github.com/ephysd/ephysd/drivers/pulsepal/pulsepaltest"
	"github.com/ephysd/ephysd/pipeline"
)

func feedReplies(data, cuts []byte) Replies {
	var r Replies
	for i := 0; len(data) > 0; i++ {
		n := len(data)
		if len(cuts) > 0 {
			n = max(1, min(n, int(cuts[i%len(cuts)])))
		}
		r.Feed(data[:n])
		data = data[n:]
	}
	return r
}

func TestReplies(t *testing.T) {
	r := feedReplies([]byte{1, 1, 0x4B, 0xFF, 1, 0, 1, 1, 7}, nil)
	if r.Confirmed != 5 || r.Bad != 4 || r.Resyncs != 3 || r.LastBad != 7 {
		t.Fatalf("%+v", r)
	}
}

func FuzzReplies(f *testing.F) {
	f.Add([]byte{1, 1, 1}, []byte{1})
	f.Add([]byte{0x4B, 23, 0, 0, 0, 1, 0xD5, 1}, []byte{2, 3})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		whole := feedReplies(data, nil)
		if whole.Confirmed+whole.Bad != uint64(len(data)) || whole.Confirmed != uint64(bytes.Count(data, []byte{Ack})) {
			t.Fatalf("%+v for %d bytes", whole, len(data))
		}
		if whole.Resyncs > whole.Bad || (whole.Bad > 0) != (whole.Resyncs > 0) || whole.Resyncs > whole.Confirmed+1 {
			t.Fatalf("%+v", whole)
		}
		if split := feedReplies(data, cuts); split != whole {
			t.Fatalf("cuts %v: %+v, whole %+v", cuts, split, whole)
		}
	})
}

// Garbage on the line between the Pulse Pal's confirmations is counted as
// bad replies (and one resync per burst), never as confirmations, and the
// confirmations after it are all counted.
func TestGarbageAtRunTime(t *testing.T) {
	fake := pulsepaltest.Start(t, pulsepaltest.Options{})
	c := config(fake.Path)
	s, err := c.OpenSink(procs)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r := rand.New(rand.NewPCG(4, 4))
	const faults = 50
	var injected uint64
	waitConfirmed := func(n uint64) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for {
			sent, conf, _ := s.Stats()
			if conf == n && sent == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("sent %d, confirmed %d, want %d", sent, conf, n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitConfirmed(1) // the level channel's initial voltage
	for i := 0; i < faults; i++ {
		g := make([]byte, 1+r.IntN(20))
		for j := range g {
			for g[j] == 0 || g[j] == Ack {
				g[j] = byte(r.UintN(256))
			}
		}
		injected += uint64(len(g))
		if err := fake.Send(g); err != nil {
			t.Fatal(err)
		}
		if err := s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(2, i%2 == 0, int64(i))}}); err != nil {
			t.Fatal(err)
		}
		waitConfirmed(uint64(i + 2))
	}
	_, _, bad := s.Stats()
	if ls := s.LinkStats(); bad != injected || ls.DiscardedBytes != injected || ls.Resyncs != faults {
		t.Fatalf("%d bad replies, link stats %+v; injected %d bytes in %d bursts", bad, ls, injected, faults)
	}
	t.Logf("%d garbage bursts, %d bytes: all counted as bad replies, %d confirmations all counted", faults, injected, faults+1)
}

// The Pulse Pal is pulled out and plugged in again 20 times (100 with
// EPHYSD_LONG_TESTS=1) while triggers keep coming, through the daemon's
// ReopeningSink: each hang-up logged and counted, the device reopened at
// its link (handshake and all), triggers reach every new device, and no
// goroutine or descriptor is left behind.
func TestHangUps(t *testing.T) {
	link := filepath.Join(t.TempDir(), "serial", "by-id", "usb-Sanworks_Pulse_Pal_2-if00")
	c := config(link)
	res := hanguptest.RunSink(t, hanguptest.Sink{
		Name: "pulsepal",
		Plug: func(int) (func(), func() int) {
			fake := pulsepaltest.Start(t, pulsepaltest.Options{Link: link})
			return fake.Close, func() int { return len(fake.Triggers()) }
		},
		Open: func() (drivers.Sink, error) { return c.Open(procs) },
		Block: func(n int) *pipeline.Block {
			return &pipeline.Block{Events: []pipeline.Event{ttl(0, n%2 == 0, int64(n))}}
		},
		Events:  5,
		HangUps: hanguptest.Count(20, 100),
	})
	t.Logf("%d hang-ups survived; %d blocks, triggers received per device %v, %d blocks dropped while away", res.State.Disconnects, res.Blocks, res.Received, res.Dropped)
}
