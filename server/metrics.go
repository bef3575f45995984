package server

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pcpd/pcpd/pinhole"
)

// metrics are the engine's Prometheus collectors.
type metrics struct {
	requests      *prometheus.CounterVec // protocol, opcode, result
	dropped       *prometheus.CounterVec // reason
	batchSize     prometheus.Histogram
	latency       prometheus.Histogram
	kernelSeconds prometheus.Histogram
	storeSeconds  prometheus.Histogram
	kernelErrors  prometheus.Counter
	storeErrors   prometheus.Counter
	revocations   *prometheus.CounterVec // cause
	// Unsolicited mapping updates (updates.go): datagrams sent, and
	// updates not (or no longer) sent, by reason.
	updatesSent    prometheus.Counter
	updatesDropped *prometheus.CounterVec
	restores       prometheus.Counter
	// The firewall watch's (fwwatch.go): pinholes put back, someone
	// else's added ones undone, checks run at once, and losses of its
	// notifications.
	watchRestored prometheus.Counter
	watchUndone   prometheus.Counter
	watchChecks   prometheus.Counter
	watchLost     prometheus.Counter
	ctWalks       prometheus.Counter
	ctSkipped     prometheus.Counter
	ctFailures    prometheus.Counter
	leases        prometheus.GaugeFunc
	absorbed      prometheus.Counter
	clockSteps    prometheus.Counter
	flushLeases   prometheus.Histogram
	flushSeconds  prometheus.Histogram
	// The kernel owner meter's (OwnerMeter), when the firewall has one.
	meterErrors prometheus.Counter
	kernelDrops prometheus.Collector
	// The owners whose every request costs a route lookup, when the
	// firewall tells (RouteLookups).
	lookupOwners prometheus.Collector
	// 1 when the kernel does not name a missing flowed6 element
	// (FlowedChecker), when the firewall tells.
	flowedUnnamed prometheus.Collector
}

func newMetrics(leases func() float64) *metrics {
	return &metrics{
		meterErrors:    counter("pcpd_owner_meter_errors_total", "Failed writes of the kernel's owner meter (its chains and maps); retried at the next ownership pass or firewall check."),
		requests:       counterVec("pcpd_requests_total", "Requests answered, by protocol (pcp, natpmp), opcode and result.", "protocol", "opcode", "result"),
		dropped:        counterVec("pcpd_requests_dropped_total", "Requests dropped without an answer, by reason (send-buffer-full: answered, but the socket's send buffer was full; unsolicited ANNOUNCEs and updates count there too).", "reason"),
		batchSize:      histogram("pcpd_batch_requests", "Requests handled together in one kernel transaction and one fsync.", []float64{1, 2, 4, 8, 16, 32, 64, 128, 256}),
		latency:        histogram("pcpd_request_seconds", "Time from a request's arrival to its reply being sent.", prometheus.ExponentialBuckets(0.0001, 2, 16)),
		kernelSeconds:  histogram("pcpd_kernel_apply_seconds", "Latency of one nftables transaction.", prometheus.ExponentialBuckets(0.0001, 2, 14)),
		storeSeconds:   histogram("pcpd_store_commit_seconds", "Latency of one durable store commit (fsync).", prometheus.ExponentialBuckets(0.0001, 2, 14)),
		kernelErrors:   counter("pcpd_kernel_errors_total", "Failed nftables transactions."),
		storeErrors:    counter("pcpd_store_errors_total", "Failed store commits."),
		revocations:    counterVec("pcpd_revocations_total", "Leases ended by the server, by cause (ownership, operator, policy, forwarded).", "cause"),
		updatesSent:    counter("pcpd_mapping_updates_sent_total", "Unsolicited MAP/PEER responses sent to clients whose mapping the server ended (RFC 6887 §14.2: up to 3 per mapping)."),
		updatesDropped: counterVec("pcpd_mapping_updates_dropped_total", "Unsolicited mapping updates not sent or stopped, by reason: queue_full (more than 4096 waiting; that client learns at its renewal), unserved (its address no longer its owner's), no_socket (its serving address gone, or on another interface than the client's route), answered (the client asked about the mapping or re-mapped it).", "reason"),
		restores:       counter("pcpd_firewall_restores_total", "Times the nftables objects were found damaged or incomplete and restored."),
		watchRestored:  counter("pcpd_firewall_watch_restored_total", "Pinholes of live leases someone else deleted from the kernel, put back as the kernel told of it (firewall watch)."),
		watchUndone:    counter("pcpd_firewall_watch_undone_adds_total", "Pinhole elements someone else added to pcpd's sets, removed (no live lease holds them) or cut back to their lease's remaining lifetime as the kernel told of it (firewall watch)."),
		watchChecks:    counter("pcpd_firewall_watch_checks_total", "Firewall checks run at once because the kernel told of someone else's change to pcpd's nftables objects, or of lost notifications."),
		watchLost:      counter("pcpd_firewall_watch_lost_total", "Times the firewall watch's socket failed or the kernel dropped its notifications (ENOBUFS); each is a firewall check and an audit."),
		ctWalks:        counter("pcpd_conntrack_flushes_total", "Walks of the conntrack table ending the connections of deleted, revoked or expired mappings (several mappings' flushes share one)."),
		ctSkipped:      counter("pcpd_conntrack_flush_filters_skipped_total", "Filters of ended IPv6 pinholes left out of a conntrack walk: the ruleset recorded no admitted flow to their address (a walk with none left is not run)."),
		ctFailures:     counter("pcpd_conntrack_flush_failures_total", "Conntrack walks that may have left flows of ended mappings (a dump or its deletes failed); their filters are walked again after a backoff."),
		leases: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pcpd_leases", Help: "Live leases.",
		}, leases),
		clockSteps:   counter("pcpd_clock_steps_total", "Steps of the wall clock (over 1 s) the engine moved its lease times with (server/clock.go)."),
		absorbed:     counter("pcpd_renewals_absorbed_total", "Early renewals answered without a kernel transaction or store commit; a flush writes them when due."),
		flushLeases:  histogram("pcpd_absorbed_flush_leases", "Leases written by one flush of absorbed renewals.", prometheus.ExponentialBuckets(1, 4, 10)),
		flushSeconds: histogram("pcpd_absorbed_flush_seconds", "Latency of one flush of absorbed renewals (kernel transaction and store commit).", prometheus.ExponentialBuckets(0.0001, 2, 16)),
	}
}

// counter, counterVec and histogram are the collectors' constructors with
// only a name, a help string and labels or buckets set.
func counter(name, help string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
}

func counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
}

func histogram(name, help string, buckets []float64) prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets})
}

func (m *metrics) collectors() []prometheus.Collector {
	c := []prometheus.Collector{m.requests, m.dropped, m.batchSize, m.latency, m.kernelSeconds, m.storeSeconds,
		m.kernelErrors, m.storeErrors, m.revocations, m.updatesSent, m.updatesDropped, m.restores, m.watchRestored, m.watchUndone, m.watchChecks, m.watchLost, m.ctWalks, m.ctSkipped, m.ctFailures, m.leases,
		m.absorbed, m.flushLeases, m.flushSeconds, m.clockSteps}
	if m.kernelDrops != nil {
		c = append(c, m.meterErrors, m.kernelDrops)
	}
	if m.lookupOwners != nil {
		c = append(c, m.lookupOwners)
	}
	if m.flowedUnnamed != nil {
		c = append(c, m.flowedUnnamed)
	}
	return c
}

// kernelDrops reports the kernel meter's drops (pinhole.MeterDrops) by
// rule: reverse-path (a source in a client's prefix arriving where the
// host does not route that prefix: spoofed, or a multipath route under
// strict) apart from owner-rate-limit (the client over its rate),
// unowned-rate-limit (the sources no client owns, together, over theirs),
// the reason names of pcpd_requests_dropped_total, and
// loopback-rate-limit (the host's own requests, any local user's, sent
// over loopback, together over --kernel-rate-limit: the host's bucket in
// control_local, h/lometer). Reading them asks the kernel nothing: the
// backend gathers them at each health check.
type kernelDrops struct {
	desc  *prometheus.Desc
	drops func() pinhole.MeterDrops
}

func newKernelDrops(drops func() pinhole.MeterDrops) *kernelDrops {
	return &kernelDrops{drops: drops, desc: prometheus.NewDesc("pcpd_kernel_requests_dropped_total",
		"Requests the kernel's meter dropped before they reached pcpd, by reason (reverse-path, owner-rate-limit, unowned-rate-limit, loopback-rate-limit: the host's own over loopback); updated at each firewall check.",
		[]string{"reason"}, nil)}
}

func (k *kernelDrops) Describe(ch chan<- *prometheus.Desc) { ch <- k.desc }

func (k *kernelDrops) Collect(ch chan<- prometheus.Metric) {
	d := k.drops()
	ch <- prometheus.MustNewConstMetric(k.desc, prometheus.CounterValue, float64(d.ReversePath), "reverse-path")
	ch <- prometheus.MustNewConstMetric(k.desc, prometheus.CounterValue, float64(d.OwnerRate), "owner-rate-limit")
	ch <- prometheus.MustNewConstMetric(k.desc, prometheus.CounterValue, float64(d.UnownedRate), "unowned-rate-limit")
	ch <- prometheus.MustNewConstMetric(k.desc, prometheus.CounterValue, float64(d.Loopback), "loopback-rate-limit")
}

// newLookupOwners counts the owners each of whose requests costs the
// kernel a route lookup (RouteLookups): the owner meter's reverse-path
// rule passes a request arriving on the interface its owner's prefixes are
// routed through unlooked, and looks up every other one; an owner whose
// prefixes are not routed as one through one interface (no route, routes
// through different interfaces, a more specific route elsewhere, policy
// rules) has no such interface. On the bench's load that lookup and its
// RCU frees were 3.3 % of all CPU samples (BENCHMARKS.md item 28).
func newLookupOwners(rl RouteLookups) prometheus.GaugeFunc {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "pcpd_owner_meter_route_lookup_owners",
		Help: "Clients each of whose requests costs the kernel a route lookup (the owner meter's reverse-path check): their prefixes are not routed as one through one interface. Route each such client's prefix through its interface (pcpd logs their names). Updated whenever pcpd reads the routes (owners changed, a route change, each firewall check).",
	}, func() float64 { return float64(len(rl.RouteLookupOwners())) })
}

// newFlowedUnnamed is 1 while unnamed says the kernel's answer to a
// lookup of a missing flowed6 element does not name the element
// (FlowedChecker; named here with the engine's other metrics, where the
// README's test finds every metric pcpd serves).
func newFlowedUnnamed(unnamed func() bool) prometheus.GaugeFunc {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "pcpd_conntrack_flowed_lookups_unnamed",
		Help: "1 when the kernel's answer to a lookup of a missing flowed6 element does not name the element (Linux before 5.19): every IPv6 delete then walks conntrack (safe, costlier); checked once at start.",
	}, func() float64 {
		if unnamed() {
			return 1
		}
		return 0
	})
}
