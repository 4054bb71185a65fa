package daemon

import (
	"context"
	"os"
	"strings"
	"sync"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// Notifier tells systemd (Type=notify) how the daemon is doing: READY=1 once
// it serves, STATUS= lines with its state, WATCHDOG=1 while the pipeline is
// healthy and STOPPING=1 on shutdown. Outside systemd (NOTIFY_SOCKET unset)
// every method does nothing; a nil *Notifier does nothing either.
type Notifier struct {
	log      *zap.Logger
	enabled  bool          // NOTIFY_SOCKET was set
	watchdog time.Duration // WATCHDOG_USEC for this process, 0 if none

	mu       sync.Mutex
	status   string    // last STATUS= sent
	failedAt time.Time // last time a failed send was logged
}

// NewNotifier reads NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID from the
// environment (left in place: with NotifyAccess=main systemd ignores
// messages from any child process that inherits them).
func NewNotifier(log *zap.Logger) *Notifier {
	if log == nil {
		log = zap.NewNop()
	}
	n := &Notifier{log: log.Named("systemd")}
	n.enabled = notifySocket() != ""
	if !n.enabled {
		return n
	}
	wd, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("watchdog disabled: bad WATCHDOG_USEC/WATCHDOG_PID from systemd", zap.Error(err))
	}
	n.watchdog = wd
	n.log.Debug("notify socket", zap.Duration("watchdog", wd))
	return n
}

// WatchdogInterval is systemd's watchdog timeout (WatchdogSec=) for this
// process, or 0 when the watchdog is off. A health check should call the
// pipeline stalled well within it.
func (n *Notifier) WatchdogInterval() time.Duration {
	if n == nil {
		return 0
	}
	return n.watchdog
}

// Ready tells systemd that start-up has finished (READY=1): call it once the
// source is open and the first block has gone through the pipeline, and
// again after a reload.
func (n *Notifier) Ready() { n.send(sd.SdNotifyReady) }

// Stopping tells systemd that a clean shutdown has begun (STOPPING=1).
func (n *Notifier) Stopping() { n.send(sd.SdNotifyStopping) }

// Status sends text as the status line `systemctl status` shows (STATUS=),
// only when it differs from the last one sent. Newlines become spaces.
func (n *Notifier) Status(text string) {
	if n == nil || !n.enabled {
		return
	}
	text = strings.Join(strings.Fields(text), " ")
	n.mu.Lock()
	same := text == n.status
	n.status = text
	n.mu.Unlock()
	if !same {
		n.send("STATUS=" + text)
	}
}

// RunWatchdog pings systemd's watchdog (WATCHDOG=1) three times per
// watchdog interval for as long as healthy returns nil, until ctx ends. When
// healthy returns an error it logs the reason (when it starts, then at most
// every 5 s, however often the reason's text changes) and sends nothing, so that a stalled pipeline makes systemd kill
// and restart the service. It returns at once when the watchdog is off.
func (n *Notifier) RunWatchdog(ctx context.Context, healthy func() error) {
	if n == nil || !n.enabled || n.watchdog <= 0 {
		return
	}
	tick := time.NewTicker(n.watchdog / 3)
	defer tick.Stop()
	var (
		sick     bool
		loggedAt time.Time
		since    time.Time
	)
	for {
		if err := healthy(); err != nil {
			now := time.Now()
			if !sick {
				since = now
			}
			if !sick || now.Sub(loggedAt) >= 5*time.Second {
				n.log.Error("unhealthy: not pinging the watchdog, systemd will restart the service",
					zap.String("reason", err.Error()), zap.Duration("for", now.Sub(since).Round(time.Millisecond)),
					zap.Duration("watchdog", n.watchdog))
				loggedAt = now
			}
			sick = true
		} else {
			if sick {
				n.log.Info("healthy again: watchdog pings resume", zap.Duration("after", time.Since(since).Round(time.Millisecond)))
				sick = false
			}
			n.send(sd.SdNotifyWatchdog)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// send writes one notification, logging failures at most every 10 s.
func (n *Notifier) send(state string) {
	if n == nil || !n.enabled {
		return
	}
	if _, err := sd.SdNotify(false, state); err != nil {
		n.mu.Lock()
		logIt := time.Since(n.failedAt) >= 10*time.Second
		if logIt {
			n.failedAt = time.Now()
		}
		n.mu.Unlock()
		if logIt {
			n.log.Warn("cannot notify systemd", zap.String("message", state), zap.String("socket", notifySocket()), zap.Error(err))
		}
	}
}

func notifySocket() string { return os.Getenv("NOTIFY_SOCKET") }
