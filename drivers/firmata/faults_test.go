package firmata

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/firmata/firmatatest"
	"github.com/ephysd/ephysd/drivers/hanguptest"
	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline"
)

// parseAll feeds data in chunks whose lengths come from cuts (whole when
// empty) and describes what came out.
type parsed struct {
	reports                               []uint16 // port<<8 | levels
	messages, discarded, resyncs, pending uint64
}

func parseReports(data, cuts []byte) parsed {
	var p ReportParser
	var out parsed
	emit := func(port int, levels byte) { out.reports = append(out.reports, uint16(port)<<8|uint16(levels)) }
	for i := 0; len(data) > 0; i++ {
		n := len(data)
		if len(cuts) > 0 {
			n = max(1, min(n, int(cuts[i%len(cuts)])))
		}
		p.Feed(data[:n], emit)
		data = data[n:]
	}
	out.messages, out.discarded, out.resyncs, out.pending = p.Messages, p.Discarded, p.Resyncs, uint64(p.Pending())
	return out
}

func (a parsed) equal(b parsed) bool {
	if len(a.reports) != len(b.reports) || a.messages != b.messages || a.discarded != b.discarded || a.resyncs != b.resyncs || a.pending != b.pending {
		return false
	}
	for i := range a.reports {
		if a.reports[i] != b.reports[i] {
			return false
		}
	}
	return true
}

func TestReportParser(t *testing.T) {
	in := []byte{
		0xF9, 2, 5, // version
		0xF0, 0x79, 2, 5, 'S', 0, 'F', 0, 0xF7, // firmware name (sysex)
		0x90, 0x04, 0x00, // port 0: pin 2
		0x33, 0x01, // data outside a message: 2 discarded
		0x91, 0x04, 0x01, // port 1: pins 10 and 15
		0x90, 0x7F, // cut short: 2 discarded
		0xE0, 0x10, 0x03, // analog, ignored
		0x90, 0x00, 0x05, // corrupted (pin-7 byte > 1): 3 discarded
		0xA5,             // not a board's command: 1 discarded
		0xF0, 0x01, 0x02, // sysex cut short: 3 discarded
		0x92, 0x00, 0x00, // port 2: nothing
		0xF7,       // stray end of sysex: 1 discarded
		0x90, 0x01, // pending
	}
	got := parseReports(in, nil)
	want := parsed{reports: []uint16{0x0004, 0x0184, 0x0200}, messages: 6, discarded: 2 + 2 + 3 + 1 + 3 + 1, resyncs: 4, pending: 2}
	if !got.equal(want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	for _, cuts := range [][]byte{{1}, {2, 5}, {7}} {
		if s := parseReports(in, cuts); !s.equal(got) {
			t.Fatalf("cuts %v: %+v", cuts, s)
		}
	}
	// A sysex without its F7 is dropped after MaxSysex bytes, and the
	// reports after it are found.
	long := append([]byte{0xF0}, make([]byte, MaxSysex+10)...)
	long = append(long, 0x90, 0x04, 0x00)
	if got := parseReports(long, nil); len(got.reports) != 1 || got.discarded != MaxSysex+11 || got.resyncs != 1 {
		t.Fatalf("endless sysex: %+v", got)
	}
}

func FuzzReportParser(f *testing.F) {
	f.Add([]byte{0xF9, 2, 5, 0x90, 0x04, 0x00, 0x91, 0x7F, 0x01}, []byte{1})
	f.Add([]byte{0xF0, 0x79, 2, 5, 'S', 0, 0xF7, 0x90, 0x00, 0x02, 0x33, 0x90}, []byte{2, 3})
	f.Add([]byte{0x90, 0x01, 0xF0, 0x01, 0xF7, 0xE3, 0x7F, 0x7F, 0xFF, 0x80}, []byte{})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		whole := parseReports(data, nil)
		if whole.discarded+whole.pending+3*uint64(len(whole.reports)) > uint64(len(data)) {
			t.Fatalf("more out than in: %+v of %d bytes", whole, len(data))
		}
		if whole.resyncs > whole.discarded || (whole.discarded > 0) != (whole.resyncs > 0) || whole.resyncs > whole.messages+1 {
			t.Fatalf("%d resyncs for %d discarded bytes and %d messages", whole.resyncs, whole.discarded, whole.messages)
		}
		if uint64(len(whole.reports)) > whole.messages {
			t.Fatalf("%d reports in %d messages", len(whole.reports), whole.messages)
		}
		for _, r := range whole.reports {
			if r>>8 > 15 {
				t.Fatalf("report for port %d", r>>8)
			}
		}
		if split := parseReports(data, cuts); !split.equal(whole) {
			t.Fatalf("cuts %v: %+v, whole %+v", cuts, split, whole)
		}
	})
}

// wellFormed reports whether garbage holds a complete message a board
// could send: damage Firmata (no checksum) cannot tell from a message.
func wellFormed(g []byte) bool {
	for i, c := range g {
		switch {
		case c&0xF0 == DigitalMessage || c&0xF0 == AnalogMessage || c == ReportVersion:
			if i+2 < len(g) && g[i+1] < 0x80 && g[i+2] < 0x80 && (c&0xF0 != DigitalMessage || g[i+2] <= 1) {
				return true
			}
		case c == StartSysex:
			j := i + 1
			for j < len(g) && g[j] < 0x80 {
				j++
			}
			if j < len(g) && g[j] == EndSysex {
				return true
			}
		}
	}
	return false
}

// Garbage, reports cut short or corrupted, lost command bytes and broken
// sysex messages are sent by the fake board while it reports an input:
// after each, the next good report is found (the input follows the pin),
// only real levels ever show, and the discarded bytes and resyncs are
// counted exactly.
func TestGarbageAtRunTime(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{})
	b := open(t, fake, config(fake.Path))
	deadline := time.Now().Add(2 * time.Second)
	for b.Stats().Reports < 2 { // the reports sent when reporting was enabled
		if time.Now().After(deadline) {
			t.Fatalf("no initial reports: %+v", b.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	r := rand.New(rand.NewPCG(8, 1))
	const faults = 100
	var injected uint64
	kinds := make([]int, 5)
	level := false
	for i := 0; i < faults; i++ {
		var g []byte
		switch kind := i % 5; kind {
		case 0:
			for g == nil || wellFormed(g) {
				g = make([]byte, 1+r.IntN(20))
				for j := range g {
					g[j] = byte(r.UintN(256))
				}
			}
		case 1: // cut short
			g = []byte{DigitalMessage | byte(r.IntN(2)), byte(r.IntN(0x80))}
		case 2: // pin-7 byte corrupted
			g = []byte{DigitalMessage | byte(r.IntN(2)), byte(r.IntN(0x80)), 2 + byte(r.IntN(0x7E))}
		case 3: // command byte lost
			g = []byte{byte(r.IntN(0x80)), byte(r.IntN(2))}
		case 4: // sysex without its end
			g = append([]byte{StartSysex}, bytes.Repeat([]byte{0x41}, r.IntN(30))...)
		}
		kinds[i%5]++
		injected += uint64(len(g))
		if err := fake.Send(g); err != nil {
			t.Fatal(err)
		}
		level = !level
		fake.SetInput(2, level)
		want := uint64(0)
		if level {
			want = 1 << 2
		}
		deadline := time.Now().Add(2 * time.Second)
		for w, _ := b.Lines(); w != want; w, _ = b.Lines() {
			if time.Now().After(deadline) {
				t.Fatalf("fault %d (% x): Lines = %#x, want %#x; stats %+v", i, g, w, want, b.Stats())
			}
			time.Sleep(time.Millisecond)
		}
	}
	st := b.Stats()
	if st.DiscardedBytes != injected || st.Resyncs != faults || st.Reports != 2+faults {
		t.Fatalf("stats %+v; injected %d bytes in %d faults, %d reports sent", st, injected, faults, 2+faults)
	}
	if ls := b.LinkStats(); ls.DiscardedBytes != injected || ls.Resyncs != faults {
		t.Fatalf("link stats %+v", ls)
	}
	t.Logf("%d faults (%d garbage, %d cut short, %d corrupted, %d lost command, %d broken sysex): %d bytes injected, %d discarded, %d resyncs, every report after them found",
		faults, kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], injected, st.DiscardedBytes, st.Resyncs)
}

// The Arduino driving TTL outputs is pulled out and plugged in again 20
// times (100 with EPHYSD_LONG_TESTS=1) while events keep coming, through
// the daemon's ReopeningSink: each hang-up logged and counted, the board
// reopened at its link (version report, pin modes), events reach every new
// board, and no goroutine or descriptor is left behind.
func TestHangUpsOutput(t *testing.T) {
	link := filepath.Join(t.TempDir(), "serial", "by-id", "usb-Arduino__www.arduino.cc__0043_75833353035351B0E1C1-if00")
	c := DefaultConfig()
	c.Path, c.ResetWaitMS = link, 1000
	c.Map = []drivers.Mapping{{Line: 0, Channel: 13}}
	res := hanguptest.RunSink(t, hanguptest.Sink{
		Name: "firmata output",
		Plug: func(int) (func(), func() int) {
			fake := firmatatest.Start(t, firmatatest.Options{Link: link})
			return fake.Close, func() int {
				n := 0
				for _, w := range fake.PortWrites() {
					if w.Port == 1 {
						n++
					}
				}
				return n - 1 // the inactive level written at open
			}
		},
		Open: func() (drivers.Sink, error) { return c.Open(procs) },
		Block: func(n int) *pipeline.Block {
			return &pipeline.Block{Events: []pipeline.Event{ttl(0, n%2 == 0, int64(n))}}
		},
		Events:  5,
		HangUps: hanguptest.Count(20, 100),
	})
	t.Logf("%d hang-ups survived; %d blocks, events received per board %v, %d blocks dropped while away", res.State.Disconnects, res.Blocks, res.Received, res.Dropped)
}

// An Arduino reporting an input line, merged into a headstage's digital
// word, is pulled out and plugged in again 10 times (50 with
// EPHYSD_LONG_TESTS=1) while the headstage streams: each hang-up logged
// and counted, the line reads 0 while the board is away and its level
// again once it is back, and no goroutine or descriptor is left behind.
func TestHangUpsInput(t *testing.T) {
	link := filepath.Join(t.TempDir(), "serial", "by-id", "usb-Arduino_Uno-if00")
	n := hanguptest.Count(10, 50)
	log, logs := hanguptest.Logger()
	plug := func() *firmatatest.FakeArduino {
		fake := firmatatest.Start(t, firmatatest.Options{Link: link})
		fake.SetInput(2, true) // reported when reporting is enabled
		return fake
	}
	sc := sim.DefaultConfig()
	sc.Channels, sc.Rate, sc.Realtime = 2, 1000, true

	before := hanguptest.Measure()
	fake := plug()
	src, err := sc.Open()
	if err != nil {
		t.Fatal(err)
	}
	in := &InputConfig{Path: link, Baud: 57600, ResetWaitMS: 1000, Pins: []int{2}}
	m, err := drivers.NewMergedSource(src, []drivers.MergedInput{{Name: "input 1 (firmata)", Config: in, FirstLine: 8}}, log)
	if err != nil {
		fake.Close()
		t.Fatal(err)
	}
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	pool, _ := pipeline.NewPool(1, 2, 10)
	defer pool.Close(false)
	blk := pool.TryGet()
	defer blk.Release()
	// readUntil reads blocks until cond holds for one (hang guard 10 s).
	readUntil := func(what string, cond func(word uint64, st drivers.DeviceState) bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			blk.Reset()
			if err := m.ReadBlock(blk); err != nil {
				t.Fatal(err)
			}
			if cond(blk.Digital[0], m.InputStates()[0]) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 10 s (word %#x, state %+v)", what, blk.Digital[0], m.InputStates()[0])
			}
		}
	}
	var during hanguptest.Resources
	for i := 0; ; i++ {
		readUntil("the pin's level in the word", func(w uint64, st drivers.DeviceState) bool {
			return w&(1<<8) != 0 && st.Reconnects == uint64(i)
		})
		if i == 0 {
			during = hanguptest.Measure()
		}
		if i == n {
			break
		}
		fake.Close()
		readUntil("the hang-up seen", func(w uint64, st drivers.DeviceState) bool {
			return st.Disconnects == uint64(i+1) && w&(1<<8) == 0
		})
		fake = plug()
	}
	hanguptest.ExpectBack(t, "firmata input after the hang-ups, compared with the first board", during, 2, 0)
	st := m.InputStates()[0]
	m.Stop()
	m.Close()
	fake.Close()
	hanguptest.ExpectBack(t, "firmata input: after closing everything", before, 2, 0)
	if st.Disconnects != uint64(n) || st.Reconnects != uint64(n) || !st.Connected {
		t.Fatalf("state %+v after %d hang-ups", st, n)
	}
	if f, r := hanguptest.CountLogs(logs, "input device failed"), hanguptest.CountLogs(logs, "input device reconnected"); f != n || r != n {
		t.Fatalf("%d failure and %d reconnection log lines for %d hang-ups", f, r, n)
	}
	t.Logf("%d hang-ups of the input board survived", n)
}
