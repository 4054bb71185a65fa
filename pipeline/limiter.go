package pipeline

import (
	"sync"
	"time"
)

// LogLimiter rate-limits a message that may repeat once per block: the first
// occurrence passes, then at most one per Interval, and each passing
// occurrence reports how many were held back since the last one.
type LogLimiter struct {
	Interval time.Duration // 0 means 10 s

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// Allow reports whether to log now and how many occurrences were suppressed
// since the last one that was logged.
func (l *LogLimiter) Allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	iv := l.Interval
	if iv == 0 {
		iv = 10 * time.Second
	}
	if !l.last.IsZero() && now.Sub(l.last) < iv {
		l.suppressed++
		return false, 0
	}
	n := l.suppressed
	l.suppressed = 0
	l.last = now
	return true, n
}

// Pending returns, and clears, the number of suppressed occurrences not yet
// reported; call it at the end of a run so the last ones are not lost.
func (l *LogLimiter) Pending() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.suppressed
	l.suppressed = 0
	return n
}
