package store

import (
	"sync"
	"sync/atomic"
)

// batch is one caller's change, encoded (and so validated) before any
// transaction starts: a lease the format can not hold fails only its own
// caller, never the transaction it would have shared.
type batch struct {
	del  [][]byte
	keys [][]byte
	vals [][]byte
}

func encodeBatch(put []Lease, del []Key) (*batch, error) {
	for i := range put {
		if err := put[i].validate(); err != nil {
			return nil, err
		}
	}
	for i := range del {
		if err := validateKey(&del[i]); err != nil {
			return nil, err
		}
	}
	// One buffer for the whole batch; slices are cut only after the last
	// append so no reallocation can leave one pointing at old memory.
	var buf []byte
	ends := make([]int, 0, len(del)+2*len(put))
	for i := range del {
		buf = appendKey(buf, &del[i])
		ends = append(ends, len(buf))
	}
	for i := range put {
		start := len(buf)
		buf = appendKey(buf, &put[i].Key)
		ends = append(ends, len(buf))
		buf = appendValue(buf, buf[start:], &put[i])
		ends = append(ends, len(buf))
	}
	b := &batch{
		del:  make([][]byte, len(del)),
		keys: make([][]byte, len(put)),
		vals: make([][]byte, len(put)),
	}
	start, j := 0, 0
	cut := func() []byte {
		v := buf[start:ends[j]:ends[j]]
		start = ends[j]
		j++
		return v
	}
	for i := range del {
		b.del[i] = cut()
	}
	for i := range put {
		b.keys[i] = cut()
		b.vals[i] = cut()
	}
	return b, nil
}

// maxGroup bounds how many callers share one transaction, which bounds the
// latency of the last one in it.
const maxGroup = 1024

// Committer is group commit: callers arriving while a transaction is being
// written wait and then share the next transaction, so N concurrent
// requests cost a few fsync rounds, not N. Each caller gets the result of
// the transaction its change was in. Safe for concurrent use.
type Committer struct {
	s *Store

	mu      sync.Mutex
	queue   []*request
	running bool

	txs      atomic.Uint64
	requests atomic.Uint64
}

type request struct {
	b    *batch
	done chan error
}

// CommitterStats: Requests/Transactions is the mean group size.
type CommitterStats struct {
	Transactions uint64
	Requests     uint64
}

// NewCommitter returns a group committer writing to s.
func (s *Store) NewCommitter() *Committer { return &Committer{s: s} }

// Stats returns the group-commit counters.
func (c *Committer) Stats() CommitterStats {
	return CommitterStats{Transactions: c.txs.Load(), Requests: c.requests.Load()}
}

// Commit is Store.Commit through the group: it blocks until the
// transaction holding this change is durable (nil) or has failed (an error,
// and nothing of any change in that transaction was applied). Changes of
// one group are applied in arrival order.
func (c *Committer) Commit(put []Lease, del []Key) error {
	b, err := encodeBatch(put, del)
	if err != nil {
		return err
	}
	r := &request{b: b, done: make(chan error, 1)}
	c.mu.Lock()
	c.queue = append(c.queue, r)
	if !c.running {
		c.running = true
		go c.run()
	}
	c.mu.Unlock()
	return <-r.done
}

// run writes groups until the queue is empty. Everything that queued while
// one transaction was being written goes into the next.
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

		bs := make([]*batch, len(group))
		for i, r := range group {
			bs[i] = r.b
		}
		err := c.s.apply(bs)
		c.txs.Add(1)
		c.requests.Add(uint64(len(group)))
		for _, r := range group {
			r.done <- err
		}
	}
}
