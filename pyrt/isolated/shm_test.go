package isolated

import (
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/ephysd/ephysd/pipeline"
)

// Events and spikes cross the shared memory intact; what does not fit an
// area is counted, never written past it; decoding the same electrodes
// again allocates nothing; a malformed area is an error, not a crash.
func TestCodec(t *testing.T) {
	evs := []pipeline.Event{
		{Kind: pipeline.EventTTL, Processor: 100, Line: 3, State: true, SampleNumber: 1 << 40, FullWord: 1<<3 | 1<<63},
		{Kind: pipeline.EventTTL, Processor: -1, Line: 255, State: false, SampleNumber: -5},
	}
	area := make([]byte, 5*eventRecord+7)
	var ew eventWriter
	ew.reset(area)
	for i := 0; i < 4; i++ {
		ew.add(&evs[i%2])
	}
	got, err := readEvents(nil, area[:ew.used], ew.n)
	if err != nil || ew.n != 4 || ew.dropped != 0 || !reflect.DeepEqual(got, []pipeline.Event{evs[0], evs[1], evs[0], evs[1]}) {
		t.Fatalf("events: %+v %v (n %d dropped %d)", got, err, ew.n, ew.dropped)
	}
	ew.add(&evs[0])
	ew.add(&evs[0])
	ew.add(&evs[1])
	if ew.n != 5 || ew.dropped != 2 || ew.used != 5*eventRecord {
		t.Fatalf("overflow: n %d dropped %d used %d", ew.n, ew.dropped, ew.used)
	}
	if _, err := readEvents(nil, area, 6); err == nil {
		t.Fatal("6 events read from an area of 5")
	}

	sps := []pipeline.Spike{
		{Processor: 100, Electrode: "Tetrode 1", ElectrodeIndex: 2, SampleNumber: 12345, SortedID: 7, Channels: 4, Samples: 3,
			Waveform: []float32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -12.5}},
		{Processor: 101, Electrode: "é", SampleNumber: -1, Channels: 1, Samples: 1, Waveform: []float32{float32(1e30)}},
		{Processor: 102, Electrode: "", Channels: 0, Samples: 0},
	}
	sarea := make([]byte, 4096)
	var sw spikeWriter
	sw.reset(sarea)
	for i := range sps {
		sw.add(&sps[i])
	}
	bad := pipeline.Spike{Electrode: "short", Channels: 2, Samples: 2, Waveform: []float32{1}}
	sw.add(&bad)
	if sw.n != 3 || sw.dropped != 1 {
		t.Fatalf("spikes: n %d dropped %d", sw.n, sw.dropped)
	}
	var r spikeReader
	dst, err := r.read(nil, sarea[:sw.used], sw.n)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]pipeline.Spike(nil), sps...)
	want[2].Waveform = nil // no values: no buffer
	if !reflect.DeepEqual(dst, want) {
		t.Fatalf("spikes:\n got %+v\nwant %+v", dst, want)
	}
	// Again into the same slice: the waveform buffers and names are reused.
	if n := testing.AllocsPerRun(100, func() { dst, _ = r.read(dst[:0], sarea[:sw.used], sw.n) }); n != 0 {
		t.Fatalf("decoding known electrodes allocates %v times", n)
	}
	// A spike area too small for what fills it: counted.
	sw.reset(make([]byte, 100))
	sw.add(&sps[0])
	sw.add(&sps[1])
	if sw.n != 1 || sw.dropped != 1 {
		t.Fatalf("small area: n %d dropped %d", sw.n, sw.dropped)
	}
	// Malformed: a size that runs past the area, an absurd shape.
	corrupt := append([]byte(nil), sarea[:sw.used]...)
	le.PutUint32(corrupt[28:], 1<<30)
	if _, err := r.read(nil, corrupt, 1); err == nil {
		t.Fatal("a spike larger than its area was read")
	}
	copy(corrupt, sarea)
	le.PutUint32(corrupt[8:], 1<<25)
	if _, err := r.read(nil, corrupt, 1); err == nil {
		t.Fatal("a spike of 2^25 channels was read")
	}
	if _, err := r.read(nil, sarea[:10], 1); err == nil {
		t.Fatal("a spike beyond the area was read")
	}
}

// A block with more TTL events than the shared memory holds: the script
// sees as many as fit, ephysd says how many it did not, and the block is
// still processed.
func TestTooManyEventsAreCounted(t *testing.T) {
	path := writeModule(t, "", "count.py", `
LOG = __file__ + ".log"
class PyProcessor:
    def __init__(self, p, c, r):
        self.n = 0
    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        self.n += 1
    def process(self, data):
        data += 1
        with open(LOG, "w") as f:
            f.write(str(self.n))
`)
	s := newIsolated(t, path, 1, nil)
	pool, _ := pipeline.NewPool(1, 1, 8)
	defer pool.Close(false)
	b := pool.TryGet()
	defer b.Release()
	const fit = eventsSize / eventRecord
	for i := 0; i < fit+100; i++ {
		b.Events = append(b.Events, pipeline.Event{Kind: pipeline.EventTTL, Processor: 100, Line: uint8(i % 64), State: i%2 == 0, SampleNumber: 3})
	}
	s.Process(b)
	seen, _ := os.ReadFile(path + ".log")
	if string(seen) != fmt.Sprint(fit) || b.Data[0] != 1 {
		t.Fatalf("the script saw %s events (want %d), data %v", seen, fit, b.Data[0])
	}
	var logged bool
	for _, e := range logsFor(s.Name()) {
		if strings.Contains(e.Message, "more events or spikes than") && e.ContextMap()["events_dropped"] == int64(100) {
			logged = true
		}
	}
	if !logged {
		t.Fatal("the dropped events were not logged")
	}
}
