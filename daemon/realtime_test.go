package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"
)

func TestClosedLoopPreset(t *testing.T) {
	cfg, err := ParseConfig("x.toml", []byte("[pipeline]\npreset = \"closed_loop\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Pipeline.BlockSamples != 1 || !cfg.Pipeline.Inline || cfg.Realtime.Priority != 50 || !cfg.Realtime.LockMemory {
		t.Fatalf("preset: %+v %+v", cfg.Pipeline, cfg.Realtime)
	}
	cfg, err = ParseConfig("x.toml", []byte("[pipeline]\npreset = \"closed_loop\"\nblock_samples = 4\n[realtime]\npriority = 0\n"))
	if err != nil || cfg.Pipeline.BlockSamples != 4 || cfg.Realtime.Priority != 0 {
		t.Fatalf("explicit keys must win: %+v %+v %v", cfg.Pipeline, cfg.Realtime, err)
	}
	if _, err := ParseConfig("x.toml", []byte("[pipeline]\npreset = \"fast\"\n")); err == nil || !strings.Contains(err.Error(), "closed_loop") {
		t.Fatalf("unknown preset: %v", err)
	}
	if _, err := ParseConfig("x.toml", []byte("[realtime]\npriority = 120\n")); err == nil || !strings.Contains(err.Error(), "1–99") {
		t.Fatalf("bad priority: %v", err)
	}
}

// fifoThreads counts this process's threads scheduled SCHED_FIFO.
func fifoThreads(t *testing.T) int {
	tasks, _ := os.ReadDir("/proc/self/task")
	n := 0
	for _, task := range tasks {
		var tid int
		fmt.Sscan(task.Name(), &tid)
		policy, _, errno := unix.RawSyscall(unix.SYS_SCHED_GETSCHEDULER, uintptr(tid), 0, 0)
		if errno == 0 && int(policy)&^unix.SCHED_RESET_ON_FORK == unix.SCHED_FIFO {
			n++
		}
	}
	return n
}

// With [realtime] priority set, the source's and the stages' threads run
// SCHED_FIFO (or, without the privilege, ephysd says so once and runs on).
func TestRealtimeThreads(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	dir := t.TempDir()
	cfg, err := ParseConfig(filepath.Join(dir, "x.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
[pipeline]
block_samples = 4
[realtime]
priority = 10
cpus = [0]
[recording]
parent_directory = %q
`, dir)))
	if err != nil {
		t.Fatal(err)
	}
	before := fifoThreads(t)
	c, err := NewChain(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	during := fifoThreads(t)
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if st := c.Runner.Stats(); st.Blocks == 0 || st.OverrunBlocks != 0 {
		t.Fatalf("stats %+v", st)
	}
	denied := logs.FilterMessageSnippet("realtime priority not permitted").Len()
	switch {
	case denied == 1:
		t.Log("realtime scheduling not permitted here; the warning was logged once")
	case during-before < 2:
		t.Fatalf("%d SCHED_FIFO threads while acquiring (%d before): want the source and stage threads", during, before)
	}
	// The source thread ends with its goroutine: no realtime thread is left
	// in Go's pool.
	deadline := time.Now().Add(2 * time.Second)
	for fifoThreads(t) > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if after := fifoThreads(t); after > before && denied == 0 {
		t.Fatalf("%d SCHED_FIFO threads left after the chain stopped (%d before)", after, before)
	}
}
