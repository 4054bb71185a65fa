//go:build race

package daemon

// raceEnabled: the race detector slows the harness's paced writer ~10×, so
// tests that measure real-time behaviour run without it (make test runs
// them in a second, race-free pass).
const raceEnabled = true
