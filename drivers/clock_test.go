package drivers

import (
	"errors"
	"io"
	"testing"
	"time"
)

func TestClockPacesAndStops(t *testing.T) {
	c := NewClock(1000)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); !errors.Is(err, ErrAlreadyStarted) {
		t.Fatalf("second Start: %v", err)
	}
	t0 := time.Now()
	if err := c.WaitUntil(50); err != nil { // 50 ms
		t.Fatal(err)
	}
	if el := time.Since(t0); el < 45*time.Millisecond {
		t.Fatalf("sample 50 at 1 kHz was due after %v", el)
	}
	if err := c.WaitUntil(10); err != nil { // already past: no wait
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- c.WaitUntil(10_000_000) }() // ~3 hours
	time.Sleep(10 * time.Millisecond)
	c.Stop()
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("stopped wait: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not end the wait")
	}
	if !c.Stopped() || !errors.Is(c.WaitUntil(1), io.EOF) {
		t.Fatal("wait after Stop")
	}
	c.Stop() // twice is fine
}
