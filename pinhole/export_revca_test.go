package pinhole

// RawRulesForTest reads chain's rules as getRules does under b.mu: on
// b.raw, the socket deleteCatchAll shares (review h/revca). It returns
// how many rules the chain holds, the raw socket's port id (0: none
// open) and the read's error.
func (b *Backend) RawRulesForTest(chain string) (int, uint32, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	rules, err := b.view().getRules(chain)
	var port uint32
	if b.raw.c != nil {
		port, _ = portOf(b.raw.c)
	}
	return len(rules), port, err
}
