// The console through the PostgreSQL JDBC driver: SCRAM, the extended protocol (JDBC prepares
// every statement), ? parameters, typed columns. Prints one line per step; tests/console.rs
// checks them. Arguments: the JDBC URL, the user, the token.
import java.sql.*;

public class ConsoleJdbc {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2])) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SHOW VERSION")) {
                r.next();
                System.out.println("version\t" + r.getString(1));
            }
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SHOW QUERY_TYPES")) {
                ResultSetMetaData m = r.getMetaData();
                System.out.println("columns\t" + m.getColumnName(1) + "," + m.getColumnName(3) + " " + m.getColumnTypeName(3));
                int n = 0;
                while (r.next()) {
                    r.getLong("percent");
                    n++;
                }
                System.out.println("query types\t" + (n > 0));
            }
            try (PreparedStatement p = c.prepareStatement("MARK ? KIND drift COLUMNS ? CLASS ? NOTE ?")) {
                p.setString(1, "direct_referrals");
                p.setString(2, "name,registration_date");
                p.setString(3, "jdbc_class");
                p.setString(4, "from JDBC");
                p.executeUpdate();
                System.out.println("mark\tok");
            }
            try (PreparedStatement p = c.prepareStatement("SET STAGE ? shadow REASON ?")) {
                p.setString(1, "direct_referrals");
                p.setString(2, "from JDBC");
                p.executeUpdate();
                System.out.println("set stage\tok");
            }
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SHOW CLIENTS")) {
                boolean me = false;
                while (r.next()) {
                    me |= r.getString("type").equals("console") && r.getBoolean("tls") == false;
                }
                System.out.println("clients\t" + me);
            }
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SHOW STATS")) {
                r.next();
                r.getLong("served_legacy");
                System.out.println("stats\t" + r.getMetaData().getColumnTypeName(11));
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SHOW MARKS")) {
                r.next();
                System.out.println("marks\t" + r.getString("note"));
            }
            c.commit();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                s.executeQuery("SHOW NOTHING");
            } catch (SQLException e) {
                System.out.println("error\t" + e.getSQLState());
            }
            System.out.println("valid\t" + c.isValid(5));
            System.out.println("isolation\t" + (c.getTransactionIsolation() == Connection.TRANSACTION_READ_COMMITTED));
            DatabaseMetaData meta = c.getMetaData();
            System.out.println("product\t" + meta.getDatabaseProductName() + " " + meta.getDatabaseMajorVersion());
        }
    }
}
