package store

import (
	"sync"
	"sync/atomic"
)

// batch is one caller's change, encoded (and so validated) before any
// record is written: a lease the format can not hold fails only its own
// caller, never the record it would have shared. buf holds the change as
// log entries (wal.go), deletes first, then puts, in the caller's order,
// then the quarantine changes the same way.
type batch struct {
	buf []byte
}

// batchPool recycles encode buffers: after warm-up, encoding a change
// allocates nothing per lease.
var batchPool = sync.Pool{New: func() any { return new(batch) }}

// maxPooled: bigger buffers (a restore's 50 000-lease commit) are left to
// the garbage collector instead of being kept for single-lease commits.
const maxPooled = 1 << 20

func getBatch() *batch { return batchPool.Get().(*batch) }

func putBatch(b *batch) {
	if cap(b.buf) > maxPooled {
		b.buf = nil
	}
	b.buf = b.buf[:0]
	batchPool.Put(b)
}

func (b *batch) encode(put []Lease, del []Key, q *QuarChange) error {
	for i := range put {
		if err := put[i].validate(); err != nil {
			return err
		}
	}
	for i := range del {
		if err := validateKey(&del[i]); err != nil {
			return err
		}
	}
	if q != nil {
		for i := range q.Put {
			if err := q.Put[i].validate(); err != nil {
				return err
			}
		}
		for i := range q.Del {
			if err := validateEndpoint(&q.Del[i]); err != nil {
				return err
			}
		}
	}
	buf := b.buf[:0]
	for i := range del {
		buf = appendDelEntry(buf, &del[i])
	}
	for i := range put {
		buf = appendPutEntry(buf, &put[i])
	}
	if q != nil {
		for i := range q.Del {
			buf = appendQuarDelEntry(buf, &q.Del[i])
		}
		for i := range q.Put {
			buf = appendQuarPutEntry(buf, &q.Put[i])
		}
	}
	b.buf = buf
	return nil
}

// maxGroup bounds how many callers share one record, which bounds the
// latency of the last one in it.
const maxGroup = 1024

// Committer is group commit: callers arriving while a record is being
// written and synced wait and then share the next record, so N concurrent
// requests cost a few fdatasyncs, not N. Each caller gets the result of
// the record its change was in. Safe for concurrent use.
type Committer struct {
	s *Store

	mu      sync.Mutex
	queue   []*request
	running bool
	bs      []*batch // run's scratch, one run at a time

	txs      atomic.Uint64
	requests atomic.Uint64
}

type request struct {
	b    *batch
	done chan error
}

var requestPool = sync.Pool{New: func() any { return &request{done: make(chan error, 1)} }}

// CommitterStats: Requests/Transactions is the mean group size.
type CommitterStats struct {
	Transactions uint64 // records written (each one fdatasync)
	Requests     uint64
}

// NewCommitter returns a group committer writing to s.
func (s *Store) NewCommitter() *Committer { return &Committer{s: s} }

// Stats returns the group-commit counters.
func (c *Committer) Stats() CommitterStats {
	return CommitterStats{Transactions: c.txs.Load(), Requests: c.requests.Load()}
}

// Commit is Store.Commit through the group: it blocks until the record
// holding this change is durable (nil) or has failed (an error, and
// nothing of any change in that record was applied). Changes of one group
// are applied in arrival order.
func (c *Committer) Commit(put []Lease, del []Key) error {
	return c.CommitQuar(put, del, nil)
}

// CommitQuar is Commit with MAP-22 quarantine changes in the same record
// (Store.CommitQuar).
func (c *Committer) CommitQuar(put []Lease, del []Key, q *QuarChange) error {
	c.s.leasesPut.Store(true)
	b := getBatch()
	if err := b.encode(put, del, q); err != nil {
		putBatch(b)
		return err
	}
	r := requestPool.Get().(*request)
	r.b = b
	c.mu.Lock()
	c.queue = append(c.queue, r)
	if !c.running {
		c.running = true
		go c.run()
	}
	c.mu.Unlock()
	err := <-r.done
	putBatch(b)
	r.b = nil
	requestPool.Put(r)
	return err
}

// run writes groups until the queue is empty. Everything that queued while
// one record was being written goes into the next.
func (c *Committer) run() {
	for {
		c.mu.Lock()
		n := min(len(c.queue), maxGroup)
		if n == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		group := c.queue[:n:n]
		c.queue = c.queue[n:]
		if len(c.queue) == 0 {
			c.queue = nil
		}
		c.mu.Unlock()

		bs := c.bs[:0]
		for _, r := range group {
			bs = append(bs, r.b)
		}
		err := c.s.apply(bs)
		clear(bs)
		c.bs = bs[:0]
		c.txs.Add(1)
		c.requests.Add(uint64(len(group)))
		for _, r := range group {
			r.done <- err
		}
	}
}
