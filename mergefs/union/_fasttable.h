/* The fast path's table (included once, by _fastpath.c): FUSE inode number ->
 * the borrowed fd, its flags and the Python Inode and Node it was set for (a
 * directory's entry also the Inode's ``sources`` then, F_DIR).
 * Open addressing with linear probing and backward-shift deletion; inode
 * numbers are sparse 64-bit values (xino-style, mergefs/union/inodes.py),
 * never 0 (an empty slot). */
typedef struct {
    uint64_t number;       /* 0: empty slot */
    int fd;
    unsigned flags;
    PyObject *inode, *node, *sources;   /* sources: NULL but for a directory */
} entry_t;

static entry_t *table;
static size_t slots, used;                 /* slots: a power of two, or 0 */
static size_t slot_of(uint64_t number)
{
    return (size_t)((number * 0x9E3779B97F4A7C15ull) >> 17) & (slots - 1);
}

static entry_t *find(uint64_t number)
{
    if (!used)
        return NULL;
    for (size_t i = slot_of(number);; i = (i + 1) & (slots - 1)) {
        if (table[i].number == number)
            return &table[i];
        if (!table[i].number)
            return NULL;
    }
}

static void release(entry_t *e)
{
    Py_CLEAR(e->inode);
    Py_CLEAR(e->node);
    Py_CLEAR(e->sources);
    e->number = 0;
}

static void remove_at(size_t i)
{
    release(&table[i]);
    used--;
    for (size_t j = (i + 1) & (slots - 1); table[j].number; j = (j + 1) & (slots - 1)) {
        size_t home = slot_of(table[j].number);
        /* move j back to i when its home is not in (i, j] (cyclically) */
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            table[i] = table[j];
            table[j].number = 0;
            table[j].inode = table[j].node = table[j].sources = NULL;
            i = j;
        }
    }
}

static int grow(void)
{
    size_t old_slots = slots, n = slots ? slots * 2 : 512;
    entry_t *old = table, *fresh = calloc(n, sizeof(entry_t));
    if (!fresh)
        return -1;
    table = fresh;
    slots = n;
    for (size_t i = 0; i < old_slots; i++) {
        if (old[i].number) {
            size_t j = slot_of(old[i].number);
            while (table[j].number)
                j = (j + 1) & (slots - 1);
            table[j] = old[i];
        }
    }
    free(old);
    return 0;
}

static void drop_number(uint64_t number)
{
    entry_t *e = find(number);
    if (e)
        remove_at((size_t)(e - table));
}

static void clear_table(void)
{
    for (size_t i = 0; i < slots; i++)
        if (table[i].number)
            release(&table[i]);
    used = 0;
}

/* Serve ``number`` through ``fd`` (set or replaced; new references to the objects);
 * -1: out of memory. */
static int put(uint64_t number, int fd, unsigned flags, PyObject *inode, PyObject *node,
               PyObject *sources)
{
    entry_t *e = find(number);
    if (!e) {
        if ((used + 1) * 2 > slots && grow() < 0)
            return -1;
        size_t i = slot_of(number);
        while (table[i].number)
            i = (i + 1) & (slots - 1);
        e = &table[i];
        used++;
    } else {
        Py_CLEAR(e->inode);
        Py_CLEAR(e->node);
        Py_CLEAR(e->sources);
    }
    e->number = number;
    e->fd = fd;
    e->flags = flags;
    e->inode = Py_NewRef(inode);
    e->node = Py_NewRef(node);
    e->sources = Py_XNewRef(sources);
    return 0;
}
