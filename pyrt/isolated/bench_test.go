package isolated

import (
	"fmt"
	"testing"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
)

const passThrough = `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        pass
`

// BenchmarkProcess is one block of 30 samples through a pass-through
// module: in ephysd's interpreter and in a worker process. The difference
// is the isolation's cost per block (`ephysd bench isolation` reports its
// distribution). Neither side allocates per block.
func BenchmarkProcess(b *testing.B) {
	for _, channels := range []int{64, 384} {
		path := writeModule(b, "", "passthrough.py", passThrough)
		pool, err := pipeline.NewPool(1, channels, 30)
		if err != nil {
			b.Fatal(err)
		}
		blk := pool.TryGet()
		for i := range blk.Data {
			blk.Data[i] = float32(i)
		}
		b.Run(fmt.Sprintf("in-process/%dch", channels), func(b *testing.B) {
			id := newID()
			st, err := testRT.NewStage(pyrt.StageConfig{ID: id, Name: fmt.Sprintf("bench#%d", id), Path: path, Channels: channels, SampleRate: 30000})
			if err != nil {
				b.Fatal(err)
			}
			testRT.Do(func() {
				st.StartAcquisition()
				for i := 0; i < 100; i++ {
					st.Process(blk)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					st.Process(blk)
				}
				b.StopTimer()
				st.StopAcquisition()
			})
		})
		b.Run(fmt.Sprintf("isolated/%dch", channels), func(b *testing.B) {
			st := newIsolated(b, path, channels, nil)
			st.StartAcquisition()
			for i := 0; i < 100; i++ {
				st.Process(blk)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				st.Process(blk)
			}
			b.StopTimer()
			st.StopAcquisition()
			if s := st.Status(); s.Errors != 0 || st.Restarts() != 0 {
				b.Fatalf("status %+v", s)
			}
		})
		blk.Release()
		pool.Close(false)
	}
}
