package recording

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestRoundToEvenMatchesMath(t *testing.T) {
	vals := []float64{0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999999999999994, 32767.5, -32768.5, 1e10 + 0.5,
		1<<51 - 0.5, -(1<<51 - 0.5)}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 100000; i++ {
		vals = append(vals, (r.Float64()-0.5)*1e6, float64(int(r.Int32()))+0.5)
	}
	for _, v := range vals {
		if got, want := roundToEven(v), math.RoundToEven(v); got != want {
			t.Fatalf("roundToEven(%v) = %v, want %v", v, got, want)
		}
	}
	for _, v := range []float64{math.Inf(1), 1e300, 1<<51 + 1, 1 << 60} {
		if roundToEven(v) < math.MaxInt16 || roundToEven(-v) > math.MinInt16 {
			t.Fatalf("%v does not stay out of int16 range", v)
		}
	}
	if x := roundToEven(math.NaN()); x == x {
		t.Fatal("NaN")
	}
}
