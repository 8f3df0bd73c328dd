//! Named tables of JSON records keyed by string, for modules that keep state in the hub's store
//! (jobs, runs) without opening its tables or transactions themselves.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Store, StoreError};

/// A table of records: `key → JSON`.
#[derive(Debug, Clone, Copy)]
pub struct RecordTable(&'static str);

impl RecordTable {
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.0)
    }
}

/// One change in a [`Store::write_records`] transaction.
pub enum RecordWrite<'a> {
    Put(RecordTable, &'a str, Vec<u8>),
    Remove(RecordTable, &'a str),
}

impl<'a> RecordWrite<'a> {
    /// Puts `value` as JSON under `key`.
    pub fn put<T: Serialize>(table: RecordTable, key: &'a str, value: &T) -> Self {
        Self::Put(
            table,
            key,
            serde_json::to_vec(value).expect("record serialises"),
        )
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    /// Creates `tables` if they do not exist yet.
    pub fn create_record_tables(&self, tables: &[RecordTable]) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        for t in tables {
            txn.open_table(t.def())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies `writes` in one transaction: all of them or (on error) none.
    pub fn write_records(&self, writes: &[RecordWrite<'_>]) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        for w in writes {
            match w {
                RecordWrite::Put(t, key, value) => {
                    txn.open_table(t.def())?.insert(*key, value.as_slice())?;
                }
                RecordWrite::Remove(t, key) => {
                    txn.open_table(t.def())?.remove(*key)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The record under `key`.
    pub fn record<T: DeserializeOwned>(
        &self,
        table: RecordTable,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(table.def())?;
        t.get(key)?.map(|v| parse(v.value())).transpose()
    }

    /// Every record of `table`, in key order.
    pub fn records<T: DeserializeOwned>(&self, table: RecordTable) -> Result<Vec<T>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let t = txn.open_table(table.def())?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(parse(row?.1.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: RecordTable = RecordTable::new("test_records");

    #[test]
    fn writes_all_or_nothing_and_reads_back_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_record_tables(&[T]).unwrap();
        store
            .write_records(&[
                RecordWrite::put(T, "b", &2),
                RecordWrite::put(T, "a", &1),
                RecordWrite::put(T, "c", &3),
                RecordWrite::Remove(T, "c"),
            ])
            .unwrap();
        assert_eq!(store.records::<i32>(T).unwrap(), vec![1, 2]);
        assert_eq!(store.record::<i32>(T, "b").unwrap(), Some(2));
        assert_eq!(store.record::<i32>(T, "c").unwrap(), None);
    }
}
