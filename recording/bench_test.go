package recording

import (
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

// hotPathRecorder returns a recorder of nch channels with a recording open
// and a block of nch × 30 samples carrying two TTL edges.
func hotPathRecorder(tb testing.TB, nch int, interval time.Duration) (*Recorder, *pipeline.Block) {
	st := pipeline.StreamInfo{ProcessorName: "Acquisition Board", ProcessorID: 100, StreamName: "Rhythm_Data", SampleRate: 30000}
	for c := 0; c < nch; c++ {
		st.Channels = append(st.Channels, pipeline.ChannelInfo{Name: "CH", Units: "uV", BitVolts: 0.195})
	}
	rec, err := NewRecorder(Config{Stream: st, EventChannels: []EventChannel{pythonChannel}, CheckpointInterval: interval})
	if err != nil {
		tb.Fatal(err)
	}
	s := NewSession(tb.TempDir(), 0, nil)
	r, err := s.Next()
	if err != nil {
		tb.Fatal(err)
	}
	b := &pipeline.Block{Channels: nch, Samples: blockSamples, Data: make([]float32, nch*blockSamples),
		Digital: make([]uint64, blockSamples), Events: make([]pipeline.Event, 0, 8), Recording: r}
	for i := range b.Data {
		b.Data[i] = float32(i%2000) * 0.37
	}
	return rec, b
}

func consumeSteady(tb testing.TB, rec *Recorder, b *pipeline.Block, first int64) {
	b.FirstSample = first
	b.Events = append(b.Events[:0],
		pipeline.Event{Kind: pipeline.EventTTL, Processor: 100, Line: 0, State: true, SampleNumber: first + 3, FullWord: 1},
		pipeline.Event{Kind: pipeline.EventTTL, Processor: 101, Line: 0, State: false, SampleNumber: first + 3, FullWord: 0})
	if err := rec.Consume(b); err != nil {
		tb.Fatal(err)
	}
}

// TestConsumeDoesNotAllocate checks the hot path, checkpoints included.
func TestConsumeDoesNotAllocate(t *testing.T) {
	rec, b := hotPathRecorder(t, 64, time.Millisecond)
	defer rec.End()
	var first int64
	for i := 0; i < 2000; i++ { // warm up: open, buffers at their size
		consumeSteady(t, rec, b, first)
		first += blockSamples
	}
	allocs := testing.AllocsPerRun(2000, func() {
		consumeSteady(t, rec, b, first)
		first += blockSamples
	})
	if allocs != 0 {
		t.Errorf("Consume allocates %v times per block in steady state", allocs)
	}
	if rec.Stats().Checkpoints < 2 {
		t.Errorf("only %d checkpoints: the test did not cover them", rec.Stats().Checkpoints)
	}
}

// BenchmarkRecorderConsume records blocks of 384 channels × 30 samples
// (a Neuropixels-size stream at 1 ms per block) with two TTL events each,
// checkpointing every 250 ms. The warm-up runs through two checkpoints so
// that every buffer has reached its steady size.
func BenchmarkRecorderConsume(b *testing.B) {
	rec, blk := hotPathRecorder(b, 384, 250*time.Millisecond)
	var first int64
	for rec.Stats().Checkpoints < 2 {
		consumeSteady(b, rec, blk, first)
		first += blockSamples
	}
	b.ReportAllocs()
	b.SetBytes(int64(384 * blockSamples * 2))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		consumeSteady(b, rec, blk, first)
		first += blockSamples
	}
	b.StopTimer()
	if err := rec.End(); err != nil {
		b.Fatal(err)
	}
}
