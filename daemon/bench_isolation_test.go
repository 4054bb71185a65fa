package daemon

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ephysd/ephysd/pyrt"
)

// TestBenchIsolationQuick runs the isolation part on a few calls: both
// sides at 64 and 384 channels, timed per call, in the table, the goals and
// the doc section. (The figures themselves are `ephysd bench isolation`'s.)
func TestBenchIsolationQuick(t *testing.T) {
	rt, err := pyrt.Start(pyrt.Config{})
	if err != nil {
		t.Fatal(err)
	}
	o := SuiteOptions{Modules: benchModules(t), PythonCalls: 50, PythonRounds: 2, PythonSample: 30}
	rs, err := BenchIsolation(o.isolationOptions(rt))
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 || rs[0].Channels != 64 || rs[1].Channels != 384 {
		t.Fatalf("results %+v", rs)
	}
	for _, r := range rs {
		if r.Calls != 100 || r.Samples != 30 || r.InProcess.Mean <= 0 || r.Isolated.Mean <= 0 || r.Isolated.P99 < r.Isolated.P50 ||
			r.ExtraMean != r.Isolated.Mean-r.InProcess.Mean {
			t.Fatalf("result %+v", r)
		}
	}
	var text bytes.Buffer
	isolationTable(rs).text(&text)
	res := &suiteResults{ran: []string{"isolation"}, Isolation: rs}
	res.goals().text(&text)
	var doc bytes.Buffer
	writeResultsSection(&doc, filepath.Join(t.TempDir(), "PERFORMANCE.md"), "ephysd bench isolation", machineInfo{}, o, res)
	for _, want := range []string{"64 × 30", "384 × 30", "extra per block (mean)", "isolated stage, 384 × 30 block, pass-through: ≤ 20 µs extra per block (mean)"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("the table or goals lack %q:\n%s", want, text.String())
		}
	}
	if !strings.Contains(doc.String(), "### Isolated Python stages") || !strings.Contains(doc.String(), "| 384 × 30 | 100 |") {
		t.Errorf("the doc section lacks the isolation table:\n%s", doc.String())
	}
}
